"""A GRADIEND job in one YAML/JSON file: base model, data, adapter config, training, evaluation and the edit to keep.

The CLI (`gradiend-hf train/evaluate/rewrite/demo`) reads a JobConfig. Every section is validated before anything is
loaded, so a typo fails in a second with the bad key, the allowed keys and the nearest match named.

    model: smollm2                  # the embedded offline model, a local folder, or a Hub id
    data:
      recipe: english_gender_names  # a built-in recipe over `text` ...
      text: wikipedia
      options: {top_names: 200}
      # ... or files: train: rows.jsonl, validation: ..., test: ..., neutral: texts.txt
    gradiend: {feature_classes: [female, male], pre_prune: 0.01}   # GradiendConfig fields
    training: {learning_rate: 1.0e-4, max_steps: 200}             # GradiendTrainingArguments fields
    evaluation: {decoder_rows: 24, neutral_contexts: gender}
    rewrite: balance                # the goal whose edit becomes the saved plain model
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

from ..config import GradiendConfig

RECIPES = ("english_gender_names", "english_gender", "english_gender_pronouns", "english_pronoun_number", "religion",
           "race", "german_articles")
TEXTS = ("wikipedia", "news")
MODEL_CLASSES = ("auto", "causal_lm", "masked_lm")


class JobConfigError(ValueError):
    """A job file that cannot run; the message names the key and the fix."""


class RunFailed(RuntimeError):
    """The run found no usable encoder (no seed converged, or the held-out correlation is below the report's bar): no
    adapter is saved as the run's result and no edit is made; report.md says why in its first lines (exit code 3)."""


def check_keys(section: str, given: Mapping[str, Any], allowed: Sequence[str]) -> None:
    """Refuse unknown keys, naming the nearest allowed one."""
    for key in given:
        if key not in allowed:
            near = difflib.get_close_matches(str(key), list(allowed), n=1)
            hint = f" Did you mean {near[0]!r}?" if near else ""
            raise JobConfigError(f"Unknown key {key!r} in {section}.{hint} Allowed keys: {', '.join(sorted(allowed))}.")


def check_choice(where: str, value: Any, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise JobConfigError(f"{where} is {value!r}; allowed values: {', '.join(map(str, allowed))}.")


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
                raise JobConfigError(f"data.text is {self.text!r}: use {' or '.join(TEXTS)} (built-in offline text) "
                                     "or a list of existing text files.")
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

    def __post_init__(self) -> None:
        if isinstance(self.neutral_contexts, str) and self.neutral_contexts != "gender":
            raise JobConfigError(f"evaluation.neutral_contexts is {self.neutral_contexts!r}: use 'gender' (built-in "
                                 "gender-neutral sentences) or a list of sentences with one [MASK].")
        if not 0 < self.lms_ratio <= 1:
            raise JobConfigError(f"evaluation.lms_ratio must be in (0, 1], got {self.lms_ratio}.")
        for name in ("decoder_rows", "neutral_texts"):
            if getattr(self, name) < 1:
                raise JobConfigError(f"evaluation.{name} must be at least 1, got {getattr(self, name)}.")

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
    """Everything a run needs; `output_dir` becomes the run folder."""

    model: str = "smollm2"
    model_class: str = "auto"
    output_dir: str = "runs/gradiend"
    seeds: list[int] = field(default_factory=lambda: [0])
    data: DataSpec = field(default_factory=lambda: DataSpec(recipe="english_gender_names"))
    gradiend: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    evaluation: EvaluationSpec = field(default_factory=EvaluationSpec)
    rewrite: str = "balance"

    def __post_init__(self) -> None:
        check_choice("model_class", self.model_class, MODEL_CLASSES)
        if not self.seeds:
            raise JobConfigError("seeds must list at least one seed, e.g. seeds: [0].")
        self.adapter_config()  # GradiendConfig validates its own values
        check_keys("training", self.training, training_fields())
        if "output_dir" in self.training:
            raise JobConfigError("training.output_dir is set by the job: use the top-level output_dir instead.")
        goals = self.evaluation.goals or self.default_goals()
        for goal in goals:
            if goal not in self.goal_names():
                raise JobConfigError(f"evaluation.goals has {goal!r}; allowed: {', '.join(self.goal_names())}.")
        if self.rewrite not in goals:
            raise JobConfigError(f"rewrite is {self.rewrite!r}, which is not among the evaluated goals {goals}.")

    # --- derived ---------------------------------------------------------------------------------------------------
    def adapter_config(self) -> GradiendConfig:
        check_keys("gradiend", self.gradiend, [f.name for f in dataclasses.fields(GradiendConfig) if f.init])
        try:
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

    def training_arguments(self, output_dir: Union[str, Path]):
        from ..trainer import GradiendTrainingArguments

        try:
            return GradiendTrainingArguments(output_dir=str(output_dir), **self.training)
        except (TypeError, ValueError) as error:
            raise JobConfigError(f"training: {error}") from error

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # --- reading ---------------------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "JobConfig":
        if not isinstance(raw, Mapping):
            raise JobConfigError(f"A job file holds a mapping of sections, got {type(raw).__name__}.")
        check_keys("the job file", raw, [f.name for f in dataclasses.fields(cls)])
        values = dict(raw)
        for name, spec in (("data", DataSpec), ("evaluation", EvaluationSpec)):
            if name in values:
                section = values[name] or {}
                if not isinstance(section, Mapping):
                    raise JobConfigError(f"{name} must be a mapping of keys, got {section!r}.")
                check_keys(name, section, [f.name for f in dataclasses.fields(spec)])
                values[name] = spec(**section)
        for name in ("gradiend", "training"):
            if name in values and not isinstance(values[name] or {}, Mapping):
                raise JobConfigError(f"{name} must be a mapping of keys, got {values[name]!r}.")
            values[name] = dict(values.get(name) or {})
        return cls(**values)

    @classmethod
    def from_file(cls, path: Union[str, Path]) -> "JobConfig":
        """Read a .yaml/.yml or .json job file (YAML is parsed with safe_load: data only, no code)."""
        path = Path(path)
        if not path.is_file():
            raise JobConfigError(f"Job file {path} does not exist.")
        text = path.read_text(encoding="utf-8")
        if path.suffix in (".yaml", ".yml"):
            import yaml

            raw = yaml.safe_load(text)
        elif path.suffix == ".json":
            raw = json.loads(text)
        else:
            raise JobConfigError(f"Job file {path}: use a .yaml, .yml or .json file.")
        return cls.from_dict(raw or {})

    def save(self, path: Union[str, Path]) -> None:
        import yaml

        from ..atomic import write_text_atomically

        write_text_atomically(path, yaml.safe_dump(self.to_dict(), sort_keys=False))


def training_fields() -> list[str]:
    from ..trainer import GradiendTrainingArguments

    return [f.name for f in dataclasses.fields(GradiendTrainingArguments) if f.init]


def demo_job(output_dir: str = "runs/demo") -> JobConfig:
    """The embedded main job: English gender on SmolLM2-135M, found and debiased, within 15 minutes on 2 CPU cores.

    Pre-pruning keeps the top 1% of the ~106M backbone weights by |mean gradient| (so a step costs little more than
    one forward+backward and the edit touches ~1M weights); names are held out between splits.

    Learning rate 1e-4, the paper's value for decoder-only models. AdamW moves every encoder weight by about the
    learning rate per step, so the encoder's pre-activation moves by about lr x ||gradient||_1 (~3000 here): at 1e-3
    it saturated tanh for both classes within three steps (h = -1 everywhere) and whether a run escaped depended on the
    initialisation. Seeds 0, 1, 2 are tried in turn until one converges.
    """
    return JobConfig(
        model="smollm2",
        output_dir=output_dir,
        seeds=[0, 1, 2],
        data=DataSpec(recipe="english_gender_names", text="wikipedia",
                      options={"top_names": 200, "names_per_template": 4, "neutral": 200}),
        gradiend={"feature_classes": ["female", "male"], "pre_prune": 0.01, "pre_prune_rows": 32},
        training={"learning_rate": 1e-4, "max_steps": 200, "per_device_train_batch_size": 4, "eval_steps": 50,
                  "save_steps": 50, "logging_steps": 10, "max_eval_rows": 32},
        evaluation=EvaluationSpec(decoder_rows=24, neutral_texts=24, neutral_contexts="gender"),
        rewrite="balance",
    )
