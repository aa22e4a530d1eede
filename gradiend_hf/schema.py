"""Turn user data (a `datasets.Dataset`, a pandas DataFrame or a list of dicts) into validated GRADIEND rows.

Bad rows fail here, early, with the row index and the fix, instead of deep inside gradient computation. Missing
alternatives are filled from the data itself, so a user only needs `masked`, `factual` and `factual_class`.
The output has one row per input row, in the same order, unless rows of classes outside the pair are dropped on
request (`other_classes="drop"`).

Data with more than two classes (race, religion, German gender x case cells) trains one pair at a time:
`prepare_rows(data, pair)` keeps the pair's transitions and turns the rows of every other class into identity rows
(target gradient zero, label 0), or drops them; `merge_classes` unites classes first, `classes_of` lists them.
"""

from __future__ import annotations

import logging
import math
import random
from collections import Counter
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import datasets
import pandas as pd

from .data import MASK, REQUIRED_COLUMNS

logger = logging.getLogger("gradiend_hf")

NEEDED_COLUMNS = ("masked", "factual", "factual_class")  # `alternative` / `alternative_class` can be filled
OTHER_CLASSES = ("identity", "drop")  # what prepare_rows does with the rows of classes outside the pair
COUNTERPARTS = "counterparts"  # optional column: per row, {class: the word's counterpart in that class}
Data = Union[datasets.Dataset, pd.DataFrame, Sequence[Mapping[str, Any]]]


def is_missing(value: Any) -> bool:
    """None, NaN / pandas NA, or an empty (all-whitespace) string."""
    if value is None or value is pd.NA or value is pd.NaT:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and not value.strip()


def _columns_of(data: Data) -> tuple[dict[str, list], Optional[datasets.Features]]:
    """The data as {column: values} (all columns of equal length) plus the input features, if any."""
    if isinstance(data, datasets.DatasetDict):
        raise TypeError(f"Got a DatasetDict with splits {list(data)}; pass one split, e.g. data['train'].")
    if isinstance(data, datasets.Dataset):
        return _label_names(dict(data[:]), data.features), data.features
    if isinstance(data, pd.DataFrame):
        return {str(name): data[name].tolist() for name in data.columns}, None
    if isinstance(data, (str, bytes)) or not isinstance(data, Iterable):
        raise TypeError(
            f"data must be a datasets.Dataset, a pandas DataFrame or a list of dicts, got {type(data).__name__}."
        )
    rows = list(data)
    names: dict[str, None] = {}
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise TypeError(f"row {i}: expected a dict with GRADIEND columns, got {type(row).__name__}: {row!r}.")
        names.update(dict.fromkeys(row))
    return {name: [row.get(name) for row in rows] for name in names}, None


def _label_names(cols: dict[str, list], features: datasets.Features) -> dict[str, list]:
    """GRADIEND columns stored as datasets.ClassLabel (ints with names in the features, e.g. factual_class) as their
    names; -1 / None (ClassLabel's missing value) stay missing, an int outside the names is named with its row."""
    for name in REQUIRED_COLUMNS:
        feature = features.get(name)
        if not isinstance(feature, datasets.ClassLabel) or name not in cols:
            continue
        values = []
        for i, value in enumerate(cols[name]):
            if value is None or value == -1:
                values.append(None)
            elif isinstance(value, int) and 0 <= value < feature.num_classes:
                values.append(feature.int2str(value))
            else:
                raise _fail(i, f"{name} {value!r} is not a label of its ClassLabel feature (names {feature.names})",
                            "fix the label or the feature's names")
        cols[name] = values
    return cols


def match_case(word: str, like: str) -> str:
    """`word` cased like `like`: "SHE" -> upper, "She" -> capitalised, otherwise as given."""
    if len(like) > 1 and like.isupper():
        return word.upper()
    if like[:1].isupper():
        return word[:1].upper() + word[1:]
    return word


def _fail(index: int, problem: str, fix: str) -> ValueError:
    return ValueError(f"row {index}: {problem}; {fix}.")


def _check_row(i: int, masked: Any, factual: Any, f_cls: Any, classes: Sequence[str]) -> None:
    if not isinstance(masked, str) or masked.count(MASK) != 1:
        found = masked.count(MASK) if isinstance(masked, str) else 0
        raise _fail(i, f"'masked' needs exactly one {MASK!r}, found {found} in {masked!r}",
                    f"put a single {MASK} where the feature word was")
    if is_missing(factual) or not isinstance(factual, str):
        raise _fail(i, f"the factual word is empty or not text ({factual!r})", "give the word that the [MASK] replaced")
    if not isinstance(f_cls, str) or is_missing(f_cls):  # a class outside the pair is fine (prepare_rows decides)
        hint = (" (class columns hold class names: map integer labels to names, or store them as a "
                "datasets.ClassLabel, whose names are used)") if isinstance(f_cls, int) else ""
        raise _fail(i, f"factual_class {f_cls!r} is not one of the feature classes {list(classes)}",
                    f"fix the class name or the feature_classes argument{hint}")


def _word_pools(factuals: list[str], f_classes: list[str], classes: Sequence[str]) -> dict[str, Counter]:
    """Per class: how often each (lower-cased) word occurs as a factual word of that class."""
    pools: dict[str, Counter] = {c: Counter() for c in classes}
    for word, cls in zip(factuals, f_classes):
        if cls in pools:  # rows of other classes lend no words to the pair
            pools[cls][word.lower()] += 1
    return pools


def _fill_alternatives(cols: dict[str, list], classes: Sequence[str], seed: int) -> int:
    """Fill missing alternative classes/words in place; returns the number of filled words."""
    factuals, f_classes = cols["factual"], cols["factual_class"]
    alts, a_classes = cols["alternative"], cols["alternative_class"]
    other = {classes[0]: classes[1], classes[1]: classes[0]}
    need: dict[str, list[int]] = {c: [] for c in classes}
    for i, (word, f_cls, alt, a_cls) in enumerate(zip(factuals, f_classes, alts, a_classes)):
        if f_cls not in other:  # a row of another class: already an identity row (see _other_class_rows)
            continue
        if is_missing(a_cls):  # an identity row keeps its class, any other row goes to the other class
            a_cls = a_classes[i] = f_cls if alt == word else other[f_cls]
        if not is_missing(alt):
            continue
        if a_cls == f_cls:
            raise _fail(i, f"no alternative given and alternative_class equals factual_class {f_cls!r}",
                        "for an identity row set alternative = factual, otherwise leave alternative_class empty")
        need[a_cls].append(i)
    pools = _word_pools(factuals, f_classes, classes)
    rng = random.Random(seed)
    for cls in classes:  # fixed order, so the draws depend only on the data and the seed
        if not need[cls]:
            continue
        if not pools[cls]:
            raise ValueError(
                f"cannot fill alternatives for class {other[cls]!r}: no row has a factual word of class {cls!r}; "
                "give an `alternative` column (e.g. row "
                f"{need[cls][0]}: {cols['masked'][need[cls][0]]!r})."
            )
        words = sorted(pools[cls])
        draws = rng.choices(words, weights=[pools[cls][w] for w in words], k=len(need[cls]))
        for i, word in zip(need[cls], draws):
            alts[i] = match_case(word, factuals[i])
    return sum(len(v) for v in need.values())


def _check_vocabulary(tokenizer, cols: dict[str, list], rows: Sequence[int]) -> None:
    """Every word must map to at least one real token, else its gradient target is empty or meaningless."""
    first: dict[str, int] = {}
    for side in ("factual", "alternative"):
        for i in rows:
            first.setdefault(cols[side][i], i)
    words = list(first)
    ids = tokenizer([" " + w for w in words], add_special_tokens=False)["input_ids"]
    unk = getattr(tokenizer, "unk_token_id", None)
    for word, word_ids in zip(words, ids):
        if not [t for t in word_ids if t != unk]:
            what = "tokenizes to nothing" if not word_ids else "tokenizes only to the unknown token"
            raise _fail(first[word], f"the word {word!r} {what}: it is not in the vocabulary of "
                        f"{type(tokenizer).__name__}", "remove or replace the word")


def _check_pairs(cols: dict[str, list]) -> None:
    for i, (word, f_cls, alt, a_cls) in enumerate(
        zip(cols["factual"], cols["factual_class"], cols["alternative"], cols["alternative_class"])
    ):
        if not isinstance(alt, str):
            raise _fail(i, f"the alternative word is not text ({alt!r})", "give a word of the other class")
        if f_cls == a_cls and word != alt:
            raise _fail(
                i,
                f"factual_class == alternative_class == {f_cls!r} but factual {word!r} != alternative {alt!r}",
                "a same-class row must be an identity row (alternative == factual); otherwise use the other class",
            )
        if f_cls != a_cls and word.strip().lower() == alt.strip().lower():
            raise _fail(
                i,
                f"factual {word!r} ({f_cls}) and alternative {alt!r} ({a_cls}) are the same word, so the row's two "
                "gradients are equal and it teaches nothing",
                "give a word of the other class as the alternative",
            )


def _to_dataset(table: dict[str, list], features: Optional[datasets.Features], extras: list[str]) -> datasets.Dataset:
    """Arrow needs one type per column; a column mixing types is named (with its types) instead of failing inside
    Arrow."""
    try:
        return datasets.Dataset.from_dict(table, features=features)
    except (TypeError, ValueError, ArithmeticError, OverflowError) as error:
        for name in extras:
            try:
                datasets.Dataset.from_dict({name: table[name]}, features=None if features is None else
                                           datasets.Features({name: features[name]}))
            except Exception:  # noqa: BLE001 - any Arrow conversion error of this one column identifies it
                kinds = sorted({type(v).__name__ for v in table[name] if not is_missing(v)})
                raise ValueError(
                    f"extra column {name!r} mixes value types {kinds}, which a datasets.Dataset cannot hold; convert "
                    "it to one type (e.g. all strings) or drop it before passing the rows."
                ) from None
        raise ValueError(f"the rows cannot be stored as a datasets.Dataset: {error}") from error


def transition_of(row: Mapping[str, Any]) -> tuple[str, str]:
    """(factual_class, alternative_class) of a row: the unit GRADIEND batches are grouped by."""
    return row["factual_class"], row["alternative_class"]


def count_transitions(dataset: Union[datasets.Dataset, Iterable[Mapping[str, Any]]]) -> dict[tuple[str, str], int]:
    """Rows per transition, in order of first appearance."""
    if isinstance(dataset, datasets.Dataset):  # whole columns at once: iterating a Column goes row by row
        cols = dataset.select_columns(["factual_class", "alternative_class"])[:]
        pairs = zip(cols["factual_class"], cols["alternative_class"])
    else:
        pairs = (transition_of(row) for row in dataset)
    return dict(Counter(pairs))


def _check_pair(feature_classes: Sequence[str], other_classes: str) -> list[str]:
    classes = list(feature_classes)
    if len(classes) != 2 or classes[0] == classes[1] or not all(isinstance(c, str) for c in classes):
        raise ValueError(f"feature_classes must be two different class names, e.g. ['female', 'male']; got {classes}.")
    if other_classes not in OTHER_CLASSES:
        raise ValueError(f"other_classes must be one of {list(OTHER_CLASSES)}, got {other_classes!r}: 'identity' keeps "
                         "the rows of classes outside the pair as identity rows, 'drop' leaves them out.")
    return classes


def _class_order(values: Iterable[Any]) -> list[str]:
    """The distinct non-missing class names in `values`, in order of first appearance."""
    return list(dict.fromkeys(v for v in values if isinstance(v, str) and not is_missing(v)))


def _other_classes(cols: dict[str, list], classes: Sequence[str]) -> list[str]:
    """The factual classes outside the pair. Refuses them when a feature class has no row at all: then a misspelt
    feature class (or a wrong feature_classes argument) would silently turn a whole class into identity rows."""
    found = _class_order(cols["factual_class"])
    others = [c for c in found if c not in classes]
    absent = [c for c in classes if c not in found]
    if others and absent:
        raise _fail(cols["factual_class"].index(others[0]),
                    f"factual_class {others[0]!r} is not one of the feature classes {list(classes)}, and no row has "
                    f"the feature class(es) {absent}; the data's classes are {found}",
                    "fix the class names in the data or the feature_classes argument (rows of classes outside the "
                    "pair become identity rows only when both feature classes have rows)")
    return others


def _check_alternative_classes(cols: dict[str, list], classes: Sequence[str]) -> None:
    """A given alternative_class must be a feature class or the factual_class of some row: anything else is a typo."""
    known = set(classes) | set(_class_order(cols["factual_class"]))
    for i, a_cls in enumerate(cols["alternative_class"]):
        if not is_missing(a_cls) and (not isinstance(a_cls, str) or a_cls not in known):
            raise _fail(i, f"alternative_class {a_cls!r} is not one of the feature classes {list(classes)} nor the "
                        "factual_class of any row", "fix the class name or the feature_classes argument")


def _check_targets(cols: dict[str, list], classes: Sequence[str], others: Sequence[str]) -> None:
    """In data with several classes every class is some row's alternative. A class outside the pair whose rows point
    elsewhere while no row points to it is therefore taken for a misspelt class name, not for a class of its own."""
    targets = set(_class_order(cols["alternative_class"]))
    for cls in others:
        if cls in targets:
            continue
        rows = [i for i, f in enumerate(cols["factual_class"]) if f == cls]
        pointing = [i for i in rows if not is_missing(cols["alternative_class"][i])]
        if pointing:
            raise _fail(pointing[0],
                        f"factual_class {cls!r} is not one of the feature classes {list(classes)}, and no row has it "
                        "as alternative_class, so it looks like a misspelt class name rather than a class of its own",
                        "fix the class name; if it is a class of its own, give its rows alternative_class = "
                        "factual_class (identity rows) or leave their alternative_class empty")


def _counterpart(mapping: Any, cls: str, factual: str) -> Optional[str]:
    """The row's word in class `cls` from its `counterparts` mapping, cased like the factual word (None: none)."""
    word = mapping.get(cls) if isinstance(mapping, Mapping) else None
    if not isinstance(word, str) or is_missing(word) or word.strip().lower() == factual.strip().lower():
        return None
    return match_case(word, factual)


def _redirect(cols: dict[str, list], classes: Sequence[str]) -> Counter:
    """Rows of the pair whose alternative_class is a third class are turned towards the pair's other class: the new
    alternative is the row's counterpart in that class (column `counterparts`), else drawn like a missing one."""
    other = {classes[0]: classes[1], classes[1]: classes[0]}
    mappings = cols.get(COUNTERPARTS)
    moved: Counter = Counter()
    for i, (word, f_cls, a_cls) in enumerate(zip(cols["factual"], cols["factual_class"], cols["alternative_class"])):
        if f_cls not in other or is_missing(a_cls) or a_cls in other:
            continue
        moved[(f_cls, a_cls)] += 1
        cols["alternative_class"][i] = other[f_cls]
        cols["alternative"][i] = _counterpart(mappings[i] if mappings else None, other[f_cls], word)
    return moved


def _other_class_rows(cols: dict[str, list], classes: Sequence[str]) -> Counter:
    """Rows of classes outside the pair become identity rows (alternative = factual, same class): their target
    gradient is exactly zero and their label 0, so they show the encoder what the feature is not."""
    converted: Counter = Counter()
    for i, (word, f_cls) in enumerate(zip(cols["factual"], cols["factual_class"])):
        if f_cls not in classes:
            cols["alternative"][i], cols["alternative_class"][i] = word, f_cls
            converted[f_cls] += 1
    return converted


def _log_prepared(dataset: datasets.Dataset, filled: int, moved: Counter, others: Counter, other_classes: str) -> None:
    counts = ", ".join(f"{a}->{b}: {k}" for (a, b), k in count_transitions(dataset).items())
    logger.info("prepared %d GRADIEND rows (%s); filled %d alternatives", len(dataset), counts, filled)
    if moved:
        logger.info("turned rows towards the pair's other class (their alternative_class lay outside the pair): %s",
                    ", ".join(f"{a}->{b}: {k}" for (a, b), k in moved.items()))
    if others:
        done = "became identity rows" if other_classes == "identity" else "were dropped"
        logger.info("rows of classes outside the pair %s: %s", done, ", ".join(f"{c}: {k}" for c, k in others.items()))


def prepare_rows(data: Data, feature_classes: Sequence[str], seed: int = 0, tokenizer=None,
                 other_classes: str = "identity") -> datasets.Dataset:
    """Validate user data and fill missing alternatives; returns the GRADIEND columns first, extra columns after.

    Missing `alternative` (column absent or None/""/NaN) becomes a word of the other class, drawn (with `seed`)
    from that class's factual words in proportion to their frequency, cased like the factual word. With a
    `tokenizer`, every word must tokenize (with a leading space) to something other than the unknown token.

    Data with more classes than the pair `feature_classes`:
    - a row whose factual_class lies outside the pair becomes an identity row (alternative = factual,
      alternative_class = factual_class: target gradient zero, label 0) with other_classes="identity", or is left out
      with other_classes="drop";
    - a row of the pair whose alternative_class is a third class is turned towards the pair's other class: its
      alternative becomes the row's word in that class from an optional `counterparts` column ({class: word}, as the
      race/religion recipes write it), else it is drawn like a missing alternative;
    - refused as typos: classes outside the pair while a feature class has no row; an alternative_class that is no
      row's factual_class; a class outside the pair whose rows point to other classes while no row points to it.
    """
    classes = _check_pair(feature_classes, other_classes)
    cols, features = _columns_of(data)
    n = len(next(iter(cols.values()), []))
    if n == 0:
        raise ValueError("no rows: the data is empty; give at least one row with a masked text and its factual word.")
    for name in NEEDED_COLUMNS:
        if name not in cols:
            raise ValueError(
                f"column {name!r} is missing; got {list(cols)}. A GRADIEND row needs {list(REQUIRED_COLUMNS)} "
                "('alternative' and 'alternative_class' may be left out and are then filled); rename your columns."
            )
    for i, (masked, factual, f_cls) in enumerate(zip(cols["masked"], cols["factual"], cols["factual_class"])):
        _check_row(i, masked, factual, f_cls, classes)
    for name in ("alternative", "alternative_class"):
        cols[name] = list(cols.get(name, [None] * n))
    others = _other_classes(cols, classes)
    _check_alternative_classes(cols, classes)
    _check_targets(cols, classes, others)
    moved = _redirect(cols, classes)
    converted = _other_class_rows(cols, classes)
    filled = _fill_alternatives(cols, classes, seed)
    _check_pairs(cols)
    kept = [i for i in range(n) if other_classes == "identity" or cols["factual_class"][i] in classes]
    if tokenizer is not None:
        _check_vocabulary(tokenizer, cols, kept)

    extras = [name for name in cols if name not in REQUIRED_COLUMNS]
    table = {name: [cols[name][i] for i in kept] for name in (*REQUIRED_COLUMNS, *extras)}
    out_features = None
    if features is not None:  # keep the user's types (e.g. ClassLabel) for the extra columns
        out_features = datasets.Features({name: datasets.Value("string") for name in REQUIRED_COLUMNS})
        out_features.update({name: features[name] for name in extras})
    dataset = _to_dataset(table, out_features, extras)
    _log_prepared(dataset, filled, moved, converted, other_classes)
    return dataset


def pair_rows(data: Data, pair: Sequence[str], other_classes: str = "identity", seed: int = 0,
              tokenizer=None) -> datasets.Dataset:
    """The rows that train one pair of a data set with several classes: `prepare_rows` under the suite's name."""
    return prepare_rows(data, pair, seed=seed, tokenizer=tokenizer, other_classes=other_classes)


def classes_of(data: Data) -> list[str]:
    """The classes present (factual_class values), in order of first appearance: the candidates for pairs."""
    if isinstance(data, datasets.Dataset) and "factual_class" in data.column_names:
        data = data.select_columns(["factual_class"])  # read one column, not the whole table
    cols, _ = _columns_of(data)
    if "factual_class" not in cols:
        raise ValueError(f"column 'factual_class' is missing; got {list(cols)}. Rename the column holding the classes.")
    return _class_order(cols["factual_class"])


def _check_mapping(mapping: Mapping[str, Sequence[str]], present: Sequence[str]) -> dict[str, str]:
    """{old class: merged class} from {merged class: [old classes]}, refusing what would merge by accident."""
    if not isinstance(mapping, Mapping) or not mapping:
        raise ValueError(f"mapping must be a non-empty dict {{merged class: [classes]}}, e.g. {{'singular': ['1SG', "
                         f"'3SG'], 'plural': ['1PL', '3PL']}}; got {mapping!r}.")
    rename: dict[str, str] = {}
    for new, olds in mapping.items():
        if not isinstance(new, str) or is_missing(new):
            raise ValueError(f"merged class names must be non-empty strings, got {new!r}; name the group.")
        if isinstance(olds, str) or not isinstance(olds, Iterable) or not list(olds):
            raise ValueError(f"group {new!r} must list the classes it merges, e.g. {{{new!r}: ['a', 'b']}}; got "
                             f"{olds!r}.")
        for old in olds:
            if old in rename:
                raise ValueError(f"class {old!r} is in two groups ({rename[old]!r} and {new!r}); put it in one.")
            if old not in present:
                raise ValueError(f"class {old!r} of group {new!r} is not in the data (classes found: {list(present)}); "
                                 "fix its spelling or remove it from the mapping.")
            rename[old] = new
    for new, olds in mapping.items():
        if new in present and new not in olds:
            raise ValueError(f"merged class {new!r} is already a class of the data that group {new!r} does not list; "
                             f"add it to the group ({[*olds, new]}) or give the group another name.")
    return rename


def merge_classes(data: Data, mapping: Mapping[str, Sequence[str]]) -> datasets.Dataset:
    """Rename classes into merged ones, e.g. {"singular": ["1SG", "3SG"], "plural": ["1PL", "3PL"]}, in
    factual_class and alternative_class; classes not in the mapping keep their names.

    A row whose factual and alternative classes end in the same merged class (1SG -> 3SG) no longer crosses the
    feature: it becomes an identity row (alternative = factual), so it stays as an example of what the feature is
    not. Nothing else changes; run prepare_rows (with the merged pair) afterwards.
    """
    cols, features = _columns_of(data)
    if "factual_class" not in cols:
        raise ValueError(f"column 'factual_class' is missing; got {list(cols)}. Rename the column holding the classes.")
    n = len(cols["factual_class"])
    present = _class_order([*cols["factual_class"], *cols.get("alternative_class", [])])
    rename = _check_mapping(mapping, present)
    merged = lambda value: rename.get(value, value) if isinstance(value, str) else value  # noqa: E731
    before = list(zip(cols["factual_class"], cols.get("alternative_class", [None] * n)))
    cols["factual_class"] = [merged(v) for v in cols["factual_class"]]
    identity = 0
    if "alternative_class" in cols:
        cols["alternative_class"] = [merged(v) for v in cols["alternative_class"]]
        within = [i for i, (f, a) in enumerate(before)
                  if not is_missing(a) and f != a and cols["factual_class"][i] == cols["alternative_class"][i]]
        if within:
            cols["alternative"] = list(cols.get("alternative", [None] * n))
            for i in within:
                cols["alternative"][i] = cols["factual"][i] if "factual" in cols else None
        identity = len(within)
    out_features = None
    if features is not None:
        out_features = datasets.Features({name: features[name] if name in features and name not in REQUIRED_COLUMNS
                                          else datasets.Value("string") for name in cols})
    dataset = _to_dataset(cols, out_features, [c for c in cols if c not in REQUIRED_COLUMNS])
    groups = "; ".join(f"{new} <- {', '.join(olds)}" for new, olds in mapping.items())
    logger.info("merged classes (%s): %d rows; %d rows became identity rows (both sides in one merged class)",
                groups, n, identity)
    return dataset
