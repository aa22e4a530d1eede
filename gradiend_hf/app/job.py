"""A GRADIEND job in one YAML/JSON file: base model, data, adapter config, training, evaluation and the edit to keep.

The CLI (`gradiend-hf train/evaluate/rewrite/demo`) reads a JobConfig. The whole job is validated before anything is
written or loaded: unknown keys (with the allowed keys and the nearest match), the type of every value (fields.py;
`1e-3` is a number although YAML 1.1 reads it as a string) and the values themselves. All problems are reported at
once, each naming its field and what it expects. A file that is not valid YAML/JSON, or that holds a YAML tag such as
`!!python/object` (never constructed: YAML is read with safe_load), is refused naming the file and the line.

    model: smollm2                  # an embedded offline model (smollm2, gemma3), a local folder, or a Hub id; or:
    # model: {name: base/, dtype: bfloat16, device_map: auto}    # from_pretrained(dtype=..., device_map=...)
    data:
      recipe: english_gender_names  # a built-in recipe over `text` ...
      text: wikipedia
      options: {top_names: 200}
      # ... or files: train: rows.jsonl, validation: ..., test: ..., neutral: texts.txt
    gradiend: {feature_classes: [female, male], pre_prune: 0.01}   # GradiendConfig fields
    training: {learning_rate: 1.0e-4, max_steps: 200}             # GradiendTrainingArguments fields
    evaluation: {decoder_rows: 24, neutral_contexts: gender}
    rewrite: balance                # the goal whose edit becomes the saved plain model
    # pairs: [[asian, white], [black, white]]   # instead of gradiend.feature_classes: a suite, one adapter per pair

Relative paths in a job file (model folder, data and text files, output_dir) are relative to the job file's folder,
so a job runs the same from any current directory: `resolve_paths` makes them absolute when the file is read, before
`--set` overrides, whose values stay relative to the current directory (they are typed there).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

from ..config import GradiendConfig
from ..offline import embedded_model, embedded_names
from .fields import Mismatch, check
from .names import canonical_goal, class_name_problems

RECIPES = ("english_gender_names", "english_gender", "english_gender_pronouns", "english_pronoun_number", "religion",
           "race", "german_articles")
TEXTS = ("wikipedia", "news")
MODEL_CLASSES = ("auto", "causal_lm", "masked_lm")
DTYPES = ("float32", "bfloat16", "float16", "auto")  # model.dtype: from_pretrained(dtype=...); auto: the checkpoint's
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
DEVICE = re.compile(r"(cpu|cuda|mps|xpu|npu|hpu)(:[0-9]+)?\Z")
OFFLOAD_DEVICES = ("disk", "meta")
# The keys of the `model:` mapping (`model: <name>` is short for `model: {name: <name>}`), with their types.
MODEL_HINTS = {"name": str, "dtype": Optional[str], "device_map": Union[None, str, int, dict[str, Union[str, int]]]}


# Fields added after run folders recorded their job's fingerprint: written only when set, so that a job without them
# reads, writes and fingerprints as before they existed (an older run folder stays valid).
# The key "" holds top-level fields of the job.
WRITTEN_WHEN_SET = {"evaluation": ("benchmarks", "benchmark_limit", "benchmark_goals", "search"),
                    "": ("pairs", "other_classes")}


class JobConfigError(ValueError):
    """A job file that cannot run; the message names the key and the fix."""


class RunFailed(RuntimeError):
    """The run found no usable encoder (no seed converged, or the held-out correlation is below the report's bar): no
    adapter is saved as the run's result and no edit is made; report.md says why in its first lines (exit code 3)."""


# Fields whose values GradiendConfig accepts in more forms than its type hints say (it converts them itself).
GRADIEND_HINTS = {
    "feature_factor": Optional[Union[float, list[float]]],
    "target_parameters": Optional[Union[str, list[str]]],
    "exclude_parameters": Optional[Union[str, list[str]]],
}
# Training arguments a job sets otherwise (the value: why and what to use instead).
TRAINING_REFUSED = {
    "output_dir": "training.output_dir is set by the job: use the top-level output_dir instead.",
    "resume_from_checkpoint": "training.resume_from_checkpoint is not read by a job (the trainer would ignore it): "
                              "continue an interrupted run with `gradiend-hf run JOB --resume` (or train --resume).",
    "push_to_hub": "training.push_to_hub would upload the training folder (checkpoints, optimizer state): push the "
                   "adapter or a rewritten model with `gradiend-hf push` instead.",
}


def unknown_keys(section: str, given: Mapping[str, Any], allowed: Sequence[str]) -> list[str]:
    """One problem per unknown key, naming the nearest allowed one."""
    problems = []
    for key in given:
        if key not in allowed:
            near = difflib.get_close_matches(str(key), list(allowed), n=1)
            hint = f" Did you mean {near[0]!r}?" if near else ""
            problems.append(f"Unknown key {key!r} in {section}.{hint} Allowed keys: {', '.join(sorted(allowed))}.")
    return problems


def check_keys(section: str, given: Mapping[str, Any], allowed: Sequence[str]) -> None:
    """Refuse unknown keys, naming the nearest allowed one."""
    problems = unknown_keys(section, given, allowed)
    if problems:
        raise JobConfigError(problems[0])


def typed_section(section: str, given: Mapping[str, Any], hints: Mapping[str, Any],
                  problems: list[str]) -> dict[str, Any]:
    """`given` with every known key's value checked against its hint (a problem appended per bad value)."""
    out = {}
    for key, value in given.items():
        if key not in hints:
            continue  # reported by unknown_keys
        try:
            out[key] = check(f"{section}.{key}" if section else str(key), value, hints[key])
        except Mismatch as error:
            problems.append(str(error))
    return out


def init_hints(cls: type) -> dict[str, Any]:
    """The type hints of a dataclass's init fields."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def job_error(source: str, problems: list[str]) -> JobConfigError:
    """One error naming `source` (the job file) and every problem, one per line."""
    if len(problems) == 1:
        return JobConfigError(f"{source}: {problems[0]}")
    return JobConfigError(f"{source} has {len(problems)} problems:\n" + "\n".join(f"  - {p}" for p in problems))


def check_choice(where: str, value: Any, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise JobConfigError(f"{where} is {value!r}; allowed values: {', '.join(map(str, allowed))}.")


def device_map_problem(device_map: Any) -> Optional[str]:
    """Why `model.device_map` cannot be passed to from_pretrained for GRADIEND (None: it can). Offloading ('disk',
    'meta') is refused: GRADIEND reads the gradients of the base weights and edits them in place, so every weight
    must be held on a device."""
    where = "model.device_map"
    offload = (f"{where}: offloading to 'disk' or 'meta' is not possible with GRADIEND (it reads the gradients of the "
               "base weights and edits them in place): map every module to a device (cpu, cuda, cuda:0, ...).")

    def device(value: Any, place: str) -> Optional[str]:
        if isinstance(value, int) and not isinstance(value, bool):
            return None if value >= 0 else f"{place} is {value}: a GPU index must be 0 or more."
        if value in OFFLOAD_DEVICES:
            return offload
        if isinstance(value, str) and DEVICE.match(value):
            return None
        return (f"{place} is {value!r}: give a device (cpu, cuda, cuda:0, mps, or a GPU index such as 0)"
                + (f" or one of {', '.join(DEVICE_MAP_STRATEGIES)}." if place == where else "."))

    if device_map is None or device_map in DEVICE_MAP_STRATEGIES:
        return None
    if isinstance(device_map, dict):
        if not device_map:
            return f"{where} is an empty mapping: map modules to devices (e.g. {{'': cpu}}), or leave it out."
        for module, value in device_map.items():
            problem = device(value, f"{where}[{module!r}]")
            if problem:
                return problem
        return None
    return device(device_map, where)


def resolve_paths(raw: Any, folder: Union[str, Path]) -> Any:
    """The raw job of a file in `folder` with its relative paths made relative to that folder (absolute): the model
    folder, output_dir, data.train/validation/test/neutral and text files. A relative `model` that is no folder next
    to the job file but reads as a Hub id (user/name) stays a Hub id. Values that are not strings are left for the
    type checks."""
    if not isinstance(raw, dict):
        return raw
    folder = Path(folder).absolute()

    def path(value: Any) -> Any:
        if not isinstance(value, str) or not value.strip():
            return value
        if Path(value).is_absolute():
            return value  # as written (an absolute path means the same from everywhere)
        expanded = Path(os.path.expanduser(value))  # ~/...: the home folder, not next to the job file
        return str(expanded) if expanded.is_absolute() else str(folder / expanded)

    def model(value: Any) -> Any:
        if not isinstance(value, str) or embedded_model(value) is not None or not value.strip():
            return value
        from ..cards import HUB_ID

        local = path(value)
        if Path(local).exists() or not HUB_ID.match(value) or value.startswith((".", "~")):
            return local
        return value

    raw = dict(raw)
    if isinstance(raw.get("model"), dict):
        raw["model"] = {**raw["model"], **({"name": model(raw["model"]["name"])} if "name" in raw["model"] else {})}
    elif "model" in raw:
        raw["model"] = model(raw["model"])
    if "output_dir" in raw:
        raw["output_dir"] = path(raw["output_dir"])
    data = raw.get("data")
    if isinstance(data, dict):
        data = dict(data)
        for key in ("train", "validation", "test", "neutral"):
            if key in data:
                data[key] = path(data[key])
        text = data.get("text")
        if isinstance(text, str) and text not in TEXTS:
            data["text"] = path(text)
        elif isinstance(text, list):
            data["text"] = [path(t) for t in text]
        raw["data"] = data
    return raw


@dataclass
class DataSpec:
    """Where the rows come from: a built-in recipe over a text source, or row files (jsonl/json/csv/parquet)."""

    recipe: Optional[str] = None
    text: Union[str, list[str]] = "wikipedia"
    options: dict[str, Any] = field(default_factory=dict)
    train: Optional[str] = None
    validation: Optional[str] = None
    test: Optional[str] = None
    neutral: Optional[str] = None

    def __post_init__(self) -> None:
        if self.recipe is None and self.train is None:
            raise JobConfigError("data needs either recipe: (one of " + ", ".join(RECIPES) + ") or train: <rows file>.")
        if self.recipe is not None and self.train is not None:
            raise JobConfigError("data has both recipe: and train:; use a recipe or row files, not both.")
        if self.recipe is not None:
            check_choice("data.recipe", self.recipe, RECIPES)
            if isinstance(self.text, str) and self.text not in TEXTS and not Path(self.text).exists():
                near = difflib.get_close_matches(Path(self.text).name, TEXTS, n=1)
                raise JobConfigError(f"data.text is {self.text!r}: use {' or '.join(TEXTS)} (built-in offline text) "
                                     "or a list of existing text files" + (f". Did you mean {near[0]!r}?" if near
                                                                           else "."))
        if self.train is not None and (self.validation is None or self.test is None):
            raise JobConfigError(
                "data with row files needs train:, validation: and test: (held-out rows to evaluate on)."
            )


@dataclass
class EvaluationSpec:
    """How the adapter is judged and the edits chosen (see evaluate_encoder / evaluate_decoder)."""

    encoder_rows: Optional[int] = None        # held-out rows for the encoder (None: all test rows)
    decoder_rows: int = 24                   # held-out rows scored for every decoder candidate
    neutral_texts: int = 24                  # neutral texts for the language-modelling score
    goals: Optional[list[str]] = None        # default: balance and strengthening each class
    lms_ratio: float = 0.99
    feature_factors: Optional[list[float]] = None
    learning_rates: Optional[list[float]] = None
    neutral_contexts: Union[None, str, list[str]] = None   # "gender" (built-in) or masked sentences
    # public bias benchmarks scored on the base and the chosen edits of benchmark_goals: a list of names (each on its
    # gender subset) or {name: subset} (crows_pairs: bias type, stereoset: domain, bbq: category; winogender: null)
    benchmarks: Union[None, list[str], dict[str, Optional[str]]] = None
    benchmark_limit: Optional[int] = None     # a seeded subsample of each benchmark's examples (None: all)
    benchmark_goals: Optional[list[str]] = None  # the edits judged besides the base (None: the rewrite goal's edit)
    search: Optional[str] = None              # "ladder" (None: the default, scores what the choice needs) or "grid"

    def __post_init__(self) -> None:
        from ..evaluation.decoder import SEARCHES

        if self.search is not None and self.search not in SEARCHES:
            raise JobConfigError(f"evaluation.search is {self.search!r}: use 'ladder' (scores only the candidates the "
                                 "choice needs, the default) or 'grid' (scores every candidate).")
        if self.encoder_rows is not None and self.encoder_rows < 1:
            raise JobConfigError(f"evaluation.encoder_rows must be at least 1 (or null: all test rows), got "
                                 f"{self.encoder_rows}.")
        if isinstance(self.neutral_contexts, str) and self.neutral_contexts != "gender":
            raise JobConfigError(f"evaluation.neutral_contexts is {self.neutral_contexts!r}: use 'gender' (built-in "
                                 "gender-neutral sentences) or a list of sentences with one [MASK].")
        if not 0 < self.lms_ratio <= 1:
            raise JobConfigError(f"evaluation.lms_ratio must be in (0, 1], got {self.lms_ratio}.")
        for name in ("decoder_rows", "neutral_texts"):
            if getattr(self, name) < 1:
                raise JobConfigError(f"evaluation.{name} must be at least 1, got {getattr(self, name)}.")
        if self.benchmark_limit is not None and self.benchmark_limit < 1:
            raise JobConfigError(f"evaluation.benchmark_limit must be at least 1 (or null: every example), got "
                                 f"{self.benchmark_limit}.")
        from ..evaluation.benchmarks import check_benchmark

        for name, subset in self.benchmark_plan().items():
            try:
                check_benchmark(name, subset)
            except ValueError as error:
                raise JobConfigError(f"evaluation.benchmarks: {error}") from None

    def benchmark_plan(self) -> dict[str, Optional[str]]:
        """{benchmark: subset} to score (a list names benchmarks on their default gender subsets)."""
        if isinstance(self.benchmarks, dict):
            return dict(self.benchmarks)
        return {name: None for name in self.benchmarks or []}

    def context_texts(self) -> Optional[list[str]]:
        """The neutral contexts to measure P(class) in (None: not configured)."""
        if self.neutral_contexts is None:
            return None
        if self.neutral_contexts == "gender":
            from ..evaluation.contexts import gender_neutral_contexts

            return gender_neutral_contexts()
        return list(self.neutral_contexts)


@dataclass
class JobConfig:
    """Everything a run needs; `output_dir` becomes the run folder.

    `model_dtype` and `model_device_map` are spelled `model.dtype` and `model.device_map` in a job file (the mapping
    form of `model:`, see from_dict/to_dict); a job without them is written as `model: <name>`, as before they
    existed, so its fingerprint is unchanged."""

    model: str = "smollm2"
    model_class: str = "auto"
    output_dir: str = "runs/gradiend"
    seeds: list[int] = field(default_factory=lambda: [0])
    data: DataSpec = field(default_factory=lambda: DataSpec(recipe="english_gender_names"))
    gradiend: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    evaluation: EvaluationSpec = field(default_factory=EvaluationSpec)
    rewrite: str = "balance"
    model_dtype: Optional[str] = None
    model_device_map: Union[None, str, int, dict[str, Union[str, int]]] = None
    # a suite: one adapter per pair of classes (gradiend.feature_classes is then left out; app/suite_pipeline.py)
    pairs: Optional[list[list[str]]] = None
    other_classes: Optional[str] = None       # suites: rows of classes outside a pair, "identity" (default) or "drop"

    def __post_init__(self) -> None:
        check_choice("model_class", self.model_class, MODEL_CLASSES)
        if self.model_dtype is not None:
            check_choice("model.dtype", self.model_dtype, DTYPES)
        problem = device_map_problem(self.model_device_map)
        if problem:
            raise JobConfigError(problem)
        if not self.model.strip() or not self.output_dir.strip():
            raise JobConfigError("model and output_dir must be non-empty: a model name or folder, and a run folder.")
        if not self.seeds:
            raise JobConfigError("seeds must list at least one seed, e.g. seeds: [0].")
        if len(set(self.seeds)) != len(self.seeds) or not all(0 <= s < 2**32 for s in self.seeds):
            raise JobConfigError(f"seeds must be different integers from 0 to 2**32 - 1, got {self.seeds}.")
        if self.pairs is not None or self.other_classes is not None:
            self.check_suite()
        classes = self.adapter_config().feature_classes  # GradiendConfig validates its own values
        problems = class_name_problems(classes)
        if problems:
            raise JobConfigError(problems[0])
        check_keys("training", self.training, training_fields())
        for key, why in TRAINING_REFUSED.items():
            if self.training.get(key) not in (None, False):
                raise JobConfigError(why)
        if self.evaluation.goals is not None:  # strengthen:<class> / weaken:<class> held in the canonical spelling
            self.evaluation.goals = [canonical_goal(goal) for goal in self.evaluation.goals]
        self.rewrite = canonical_goal(self.rewrite)
        goals = self.evaluation.goals or self.default_goals()
        for goal in goals:
            if goal not in self.goal_names():
                raise JobConfigError(f"evaluation.goals has {goal!r}; allowed: {', '.join(self.goal_names())} "
                                     "(-<class> may also be written weaken:<class>).")
        if self.rewrite not in goals:
            raise JobConfigError(f"rewrite is {self.rewrite!r}, which is not among the evaluated goals {goals}.")
        if self.evaluation.benchmark_goals is not None:
            self.evaluation.benchmark_goals = [canonical_goal(goal) for goal in self.evaluation.benchmark_goals]
            for goal in self.evaluation.benchmark_goals:
                if goal not in goals:
                    raise JobConfigError(f"evaluation.benchmark_goals has {goal!r}, which is not among the evaluated "
                                         f"goals {goals}; list goals the job chooses an edit for.")

    # --- derived ---------------------------------------------------------------------------------------------------
    def check_suite(self) -> None:
        """A suite job names its pairs (each two different classes, none twice), no gradiend.feature_classes, and
        keeps the default goals and rewrite (each pair is evaluated for balance and for each of its classes)."""
        if self.pairs is None:
            raise JobConfigError("other_classes is set but pairs is not: other_classes says what a suite's pairs do "
                                 "with the rows of the other classes; give pairs: [[a, b], ...] or leave it out.")
        if self.other_classes is not None:
            from ..schema import OTHER_CLASSES

            check_choice("other_classes", self.other_classes, OTHER_CLASSES)
        if "feature_classes" in self.gradiend:
            raise JobConfigError("a job with pairs: takes its classes from the pairs; leave gradiend.feature_classes "
                                 "out (or drop pairs: to train one adapter).")
        if not self.pairs:
            raise JobConfigError("pairs is empty: list the pairs to train, e.g. pairs: [[asian, white], [black, "
                                 "white]].")
        seen: set[frozenset] = set()
        for pair in self.pairs:
            if len(pair) != 2:
                raise JobConfigError(f"pairs: {pair} is not a pair; write each as [class_a, class_b].")
            if pair[0] == pair[1]:
                raise JobConfigError(f"pairs: {pair} names the same class twice; a pair is two different classes.")
            if frozenset(pair) in seen:
                raise JobConfigError(f"pairs: {pair} is given twice ([b, a] is [a, b] with the sign flipped); keep "
                                     "one.")
            seen.add(frozenset(pair))
            problems = class_name_problems(pair)
            if problems:
                raise JobConfigError(problems[0].replace("gradiend.feature_classes", "pairs"))
        if self.evaluation.goals is not None or self.rewrite != "balance":
            raise JobConfigError("a job with pairs: evaluates every pair for balance and for each of its classes and "
                                 "saves no rewritten model: leave evaluation.goals and rewrite out.")

    def pair_job(self, pair: Sequence[str]) -> "JobConfig":
        """This suite job as the job of one of its pairs (gradiend.feature_classes = the pair)."""
        return dataclasses.replace(self, pairs=None, other_classes=None,
                                   gradiend={**self.gradiend, "feature_classes": list(pair)})

    def adapter_config(self) -> GradiendConfig:
        check_keys("gradiend", self.gradiend, [f.name for f in dataclasses.fields(GradiendConfig) if f.init])
        try:
            if self.pairs and "feature_classes" not in self.gradiend:  # a suite: the first pair stands for all
                return GradiendConfig(**self.gradiend, feature_classes=list(self.pairs[0]))
            return GradiendConfig(**self.gradiend)
        except (TypeError, ValueError) as error:
            raise JobConfigError(f"gradiend: {error}") from error

    def goal_names(self) -> list[str]:
        classes = self.adapter_config().feature_classes
        return ["balance", *classes, *(f"-{c}" for c in classes)]

    def default_goals(self) -> list[str]:
        return ["balance", *self.adapter_config().feature_classes]

    @property
    def goals(self) -> list[str]:
        return list(self.evaluation.goals or self.default_goals())

    @property
    def benchmark_goals(self) -> list[str]:
        """The chosen edits the bias benchmarks judge besides the base: by default only the rewrite goal's (the model
        the job saves), since each judged model costs a full pass over every benchmark."""
        goals = self.evaluation.benchmark_goals
        return list(goals) if goals is not None else [self.rewrite]

    def training_arguments(self, output_dir: Union[str, Path]):
        from ..trainer import GradiendTrainingArguments

        try:
            return GradiendTrainingArguments(output_dir=str(output_dir), **self.training)
        except (TypeError, ValueError) as error:
            raise JobConfigError(f"training: {error}") from error

    def to_dict(self) -> dict[str, Any]:
        """The job as a job file holds it: `model` is a mapping only when it has a dtype or device_map."""
        out = dataclasses.asdict(self)
        for section, names in WRITTEN_WHEN_SET.items():
            node = out[section] if section else out
            for name in names:
                if node[name] is None:
                    del node[name]
        dtype, device_map = out.pop("model_dtype"), out.pop("model_device_map")
        if dtype is not None or device_map is not None:
            out["model"] = {"name": self.model, "dtype": dtype, "device_map": device_map}
        return out

    def load_options(self) -> dict[str, Any]:
        """Keyword arguments for from_pretrained: dtype (a torch dtype, or "auto") and device_map, when set."""
        options: dict[str, Any] = {}
        if self.model_dtype is not None:
            import torch

            options["dtype"] = "auto" if self.model_dtype == "auto" else getattr(torch, self.model_dtype)
        if self.model_device_map is not None:
            options["device_map"] = self.model_device_map
        return options

    # --- reading ---------------------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: Any, source: str = "the job") -> "JobConfig":
        """Validate a parsed job (keys, then the type of every value, all problems at once; then the values)."""
        if raw is None:
            raw = {}
        if not isinstance(raw, Mapping):
            raise JobConfigError(f"{source}: a job holds a mapping of sections (model:, data:, ...), got "
                                 f"{type(raw).__name__}.")
        top = {k: v for k, v in init_hints(cls).items() if k not in ("model_dtype", "model_device_map")}
        problems = unknown_keys("the job file", raw, list(top))
        raw, model = dict(raw), raw.get("model")
        if isinstance(model, Mapping):  # model: {name, dtype, device_map}
            problems += unknown_keys("model", model, list(MODEL_HINTS))
            options = typed_section("model", model, MODEL_HINTS, problems)
            if "name" not in model:
                problems.append(f"model: the mapping needs name: <a model folder, a Hub id or an embedded model: "
                                f"{embedded_names()}>.")
            raw["model"] = options.get("name", "smollm2")
            extra = {"model_dtype": options.get("dtype"), "model_device_map": options.get("device_map")}
        else:
            extra = {}
        values = typed_section("", {k: v for k, v in raw.items() if k not in SECTIONS}, top, problems)
        values.update({k: v for k, v in extra.items() if v is not None})
        for name, hints in section_hints().items():
            if name not in raw:
                continue
            section = {} if raw[name] is None else raw[name]
            if not isinstance(section, Mapping):
                problems.append(f"{name}: expected a mapping of keys (key: value); got {section!r}.")
                continue
            problems += unknown_keys(name, section, list(hints))
            if name == "training":  # said before its type: the key itself is the problem
                refused = [k for k in TRAINING_REFUSED if section.get(k) not in (None, False)]
                problems += [TRAINING_REFUSED[k] for k in refused]
                section = {k: v for k, v in section.items() if k not in refused}
            values[name] = typed_section(name, section, hints, problems)
        if problems:
            raise job_error(source, problems)
        try:
            for name, spec in (("data", DataSpec), ("evaluation", EvaluationSpec)):
                if name in values:
                    values[name] = spec(**values[name])
            return cls(**values)
        except JobConfigError as error:
            raise job_error(source, [str(error)]) from None

    @classmethod
    def from_file(cls, path: Union[str, Path]) -> "JobConfig":
        """Read a .yaml/.yml or .json job file (YAML is parsed with safe_load: data only, no code)."""
        return cls.from_dict(read_job_file(path), source=f"job file {path}")

    def save(self, path: Union[str, Path]) -> None:
        import yaml

        from ..atomic import write_text_atomically

        write_text_atomically(path, yaml.safe_dump(self.to_dict(), sort_keys=False))


SECTIONS = ("data", "gradiend", "training", "evaluation")


def training_fields() -> list[str]:
    from ..trainer import GradiendTrainingArguments

    return [f.name for f in dataclasses.fields(GradiendTrainingArguments) if f.init]


def section_hints() -> dict[str, dict[str, Any]]:
    """The type hint of every key of each section."""
    from ..trainer import GradiendTrainingArguments

    return {
        "data": init_hints(DataSpec),
        "gradiend": {**init_hints(GradiendConfig), **GRADIEND_HINTS},
        "training": init_hints(GradiendTrainingArguments),
        "evaluation": init_hints(EvaluationSpec),
    }


# --- parsing ---------------------------------------------------------------------------------------------------------
def read_job_file(path: Union[str, Path]) -> Any:
    """The parsed content of a .yaml/.yml or .json job file; a file that cannot be read names the file and the fix."""
    path = Path(path)
    if not path.is_file():
        raise JobConfigError(f"Job file {path} does not exist.")
    if path.suffix not in (".yaml", ".yml", ".json"):
        raise JobConfigError(f"Job file {path}: use a .yaml, .yml or .json file.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise JobConfigError(f"Job file {path} is not UTF-8 text ({error.reason} at byte {error.start}).") from None
    if path.suffix == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as error:
            raise JobConfigError(f"Job file {path} is not valid JSON: {error.msg} at line {error.lineno}, column "
                                 f"{error.colno}.") from None
    return parse_yaml(text, f"Job file {path}")


def parse_yaml(text: str, where: str) -> Any:
    """YAML read with safe_load (plain data: a tag such as !!python/object is refused, never constructed); a syntax
    error or a key given twice in one mapping (YAML would keep the last silently) names `where` and the line."""
    import yaml

    try:
        refuse_duplicate_keys(yaml.compose(text, Loader=yaml.SafeLoader), where)
        return yaml.safe_load(text)
    except yaml.constructor.ConstructorError as error:
        line = f" (line {error.problem_mark.line + 1})" if error.problem_mark else ""
        raise JobConfigError(f"{where}{line}: {error.problem}. A job holds plain data (mappings, lists, strings, "
                             "numbers, true/false, null); YAML tags such as !!python/object are not allowed.") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        place = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error)
        raise JobConfigError(f"{where} is not valid YAML{place}: {problem}. Quote strings that hold YAML "
                             "punctuation ([ ] { } : , #).") from None


def refuse_duplicate_keys(node: Any, where: str) -> None:
    import yaml

    if isinstance(node, yaml.MappingNode):
        seen = set()
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode) and key.value != "<<":
                if key.value in seen:
                    raise JobConfigError(f"{where} (line {key.start_mark.line + 1}): key {key.value!r} is given twice "
                                         "in the same mapping; YAML would keep only the last one. Keep one.")
                seen.add(key.value)
            refuse_duplicate_keys(value, where)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            refuse_duplicate_keys(item, where)


def demo_job(output_dir: str = "runs/demo") -> JobConfig:
    """The embedded main job: English gender on SmolLM2-135M, found and debiased, within 15 minutes on 2 CPU cores.

    Pre-pruning keeps the top 1% of the ~106M backbone weights by |mean gradient| (so a step costs little more than
    one forward+backward and the edit touches ~1M weights); names are held out between splits.

    Learning rate 1e-4, the paper's value for decoder-only models. AdamW moves every encoder weight by about the
    learning rate per step, so the encoder's pre-activation moves by about lr x ||gradient||_1 (~3000 here): at 1e-3
    it saturated tanh for both classes within three steps (h = -1 everywhere) and whether a run escaped depended on the
    initialisation. Seeds 0, 1, 2 are tried in turn until one converges. Training stops once the encoder has
    converged and an evaluation no longer raises its held-out |correlation| by more than 0.001 (it is final then).
    CrowS-Pairs gender (262 pairs) and StereoSet gender (255 triples) judge the base and each chosen edit on public
    data.
    """
    return JobConfig(
        model="smollm2",
        output_dir=output_dir,
        seeds=[0, 1, 2],
        data=DataSpec(recipe="english_gender_names", text="wikipedia",
                      options={"top_names": 200, "names_per_template": 4, "neutral": 200}),
        gradiend={"feature_classes": ["female", "male"], "pre_prune": 0.01, "pre_prune_rows": 32},
        training={"learning_rate": 1e-4, "max_steps": 200, "per_device_train_batch_size": 4, "eval_steps": 50,
                  "save_steps": 50, "logging_steps": 10, "max_eval_rows": 32, "early_stopping_patience": 1},
        evaluation=EvaluationSpec(decoder_rows=24, neutral_texts=24, neutral_contexts="gender",
                                  benchmarks=["crows_pairs", "stereoset"]),
        rewrite="balance",
    )
