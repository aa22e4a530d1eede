"""Turn user data (a `datasets.Dataset`, a pandas DataFrame or a list of dicts) into validated GRADIEND rows.

Bad rows fail here, early, with the row index and the fix, instead of deep inside gradient computation. Missing
alternatives are filled from the data itself, so a user only needs `masked`, `factual` and `factual_class`.
Nothing is ever dropped: the output has exactly one row per input row, in the same order.
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
    if f_cls not in classes:
        hint = (" (class columns hold class names: map integer labels to names, or store them as a "
                "datasets.ClassLabel, whose names are used)") if isinstance(f_cls, int) else ""
        raise _fail(i, f"factual_class {f_cls!r} is not one of the feature classes {list(classes)}",
                    f"fix the class name or the feature_classes argument{hint}")


def _word_pools(factuals: list[str], f_classes: list[str], classes: Sequence[str]) -> dict[str, Counter]:
    """Per class: how often each (lower-cased) word occurs as a factual word of that class."""
    pools: dict[str, Counter] = {c: Counter() for c in classes}
    for word, cls in zip(factuals, f_classes):
        pools[cls][word.lower()] += 1
    return pools


def _fill_alternatives(cols: dict[str, list], classes: Sequence[str], seed: int) -> int:
    """Fill missing alternative classes/words in place; returns the number of filled words."""
    factuals, f_classes = cols["factual"], cols["factual_class"]
    alts, a_classes = cols["alternative"], cols["alternative_class"]
    other = {classes[0]: classes[1], classes[1]: classes[0]}
    need: dict[str, list[int]] = {c: [] for c in classes}
    for i, (word, f_cls, alt, a_cls) in enumerate(zip(factuals, f_classes, alts, a_classes)):
        if is_missing(a_cls):  # an identity row keeps its class, any other row goes to the other class
            a_cls = a_classes[i] = f_cls if alt == word else other[f_cls]
        if a_cls not in classes:
            raise _fail(i, f"alternative_class {a_cls!r} is not one of the feature classes {list(classes)}",
                        "fix the class name or the feature_classes argument")
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


def _check_vocabulary(tokenizer, cols: dict[str, list]) -> None:
    """Every word must map to at least one real token, else its gradient target is empty or meaningless."""
    first: dict[str, int] = {}
    for side in ("factual", "alternative"):
        for i, word in enumerate(cols[side]):
            first.setdefault(word, i)
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


def prepare_rows(data: Data, feature_classes: Sequence[str], seed: int = 0, tokenizer=None) -> datasets.Dataset:
    """Validate user data and fill missing alternatives; returns the GRADIEND columns first, extra columns after.

    Missing `alternative` (column absent or None/""/NaN) becomes a word of the other class, drawn (with `seed`)
    from that class's factual words in proportion to their frequency, cased like the factual word. With a
    `tokenizer`, every word must tokenize (with a leading space) to something other than the unknown token.
    """
    classes = list(feature_classes)
    if len(classes) != 2 or classes[0] == classes[1] or not all(isinstance(c, str) for c in classes):
        raise ValueError(f"feature_classes must be two different class names, e.g. ['female', 'male']; got {classes}.")
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
    filled = _fill_alternatives(cols, classes, seed)
    _check_pairs(cols)
    if tokenizer is not None:
        _check_vocabulary(tokenizer, cols)

    extras = [name for name in cols if name not in REQUIRED_COLUMNS]
    table = {name: cols[name] for name in (*REQUIRED_COLUMNS, *extras)}
    out_features = None
    if features is not None:  # keep the user's types (e.g. ClassLabel) for the extra columns
        out_features = datasets.Features({name: datasets.Value("string") for name in REQUIRED_COLUMNS})
        out_features.update({name: features[name] for name in extras})
    dataset = _to_dataset(table, out_features, extras)
    counts = ", ".join(f"{a}->{b}: {k}" for (a, b), k in count_transitions(dataset).items())
    logger.info("prepared %d GRADIEND rows (%s); filled %d alternatives", n, counts, filled)
    return dataset
