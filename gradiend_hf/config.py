"""GradiendConfig: the adapter's configuration, a PEFT config so the same JSON serves PEFT and transformers."""

from __future__ import annotations

import enum
import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Optional, Union

from peft import PeftConfig

from .selection import compile_pattern

CONFIG_NAME = "adapter_config.json"
GRADIENT_KINDS = ("factual", "alternative", "diff")
OBJECTIVES = ("auto", "masked_lm", "causal_lm", "auxiliary_mlm")
ENCODER_ACTIVATIONS = ("tanh", "identity", "sigmoid")
DECODER_ACTIVATIONS = ("identity", "tanh")
POST_PRUNE_CRITERIA = ("decoder", "encoder", "decoder_bias", "decoder_sum")


class GradiendType(str, enum.Enum):
    """PEFT needs an enum member (it calls `peft_type.value`); PEFT's own enum is closed, so we bring ours."""

    GRADIEND = "GRADIEND"


def _typed(name: str, value: Any, types: Union[type, tuple], optional: bool = False, finite: bool = False) -> None:
    """Refuse a value of the wrong JSON type (bools are not numbers here) or, for `finite`, NaN and infinity."""
    if value is None and optional:
        return
    types = types if isinstance(types, tuple) else (types,)
    if isinstance(value, bool) and bool not in types or not isinstance(value, types):
        names = {int: "an integer", float: "a number", bool: "a boolean", str: "a string", list: "a list",
                 dict: "an object"}
        wanted = "a number" if {int, float} <= set(types) else " or ".join(names.get(t, t.__name__) for t in types)
        raise ValueError(
            f"GradiendConfig.{name}={value!r} ({type(value).__name__}) must be {wanted}"
            + (" or null." if optional else ".")
            + (" Write booleans as true/false without quotes." if bool in types else "")
        )
    if finite and not math.isfinite(value):
        raise ValueError(f"GradiendConfig.{name}={value!r} must be a finite number.")


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"GradiendConfig.{name}={value!r} is not allowed; choose one of {list(allowed)}.")


@dataclass
class GradiendConfig(PeftConfig):
    """Configuration of a GRADIEND adapter ([`GradiendModel`]): which gradients it reads, of which base weights, how
    its one-neuron bottleneck is shaped, and the edit chosen after training. A `PeftConfig`, so the same
    adapter_config.json loads with `GradiendModel.from_pretrained`, `PeftModel.from_pretrained` and transformers'
    `load_adapter`. Every field also carries a help string (`GradiendConfig.help()` prints them).

    Args:
        > The feature

        feature_classes (`list[str]`):
            The two feature classes, in order, e.g. `["female", "male"]`. The first reads h = +1 on the feature neuron,
            the second h = -1. Required.

        > The bottleneck

        latent_dim (`int`, defaults to `1`):
            Size of the bottleneck. 1 is the method's single feature neuron; more units learn several directions.
        encoder_activation (`str`, defaults to `"tanh"`):
            Activation of h = act(<W_e, s> + b_e): `"tanh"`, `"identity"` or `"sigmoid"`.
        decoder_activation (`str`, defaults to `"identity"`):
            Activation of the decoder output dec(h) = act_d(h W_d + b_d): `"identity"` or `"tanh"`.
        decoder_bias (`bool`, defaults to `True`):
            Learn the decoder bias b_d, the part of the update that does not depend on h (dec(0) = b_d is the
            "balance" direction used for debiasing).
        init_seed (`int`, defaults to `0`):
            Seed of the initialisation (W_e uniform in +-1/sqrt(n), W_d and b_d uniform in +-max|W_e|).

        > Which gradients and which base weights

        source (`str`, defaults to `"alternative"`):
            The gradient the encoder reads: `"factual"` (loss of the row's own class word), `"alternative"` (loss of
            the other class's word) or `"diff"` (factual - alternative).
        target (`str`, defaults to `"diff"`):
            The gradient the decoder reconstructs, same choices as `source`.
        target_parameters (`list[str]`, *optional*):
            Regular expressions (`re.search`) over base parameter names to read and edit. `None` selects every
            backbone parameter including the input embeddings, excluding the LM head and anything tied to it.
        exclude_parameters (`list[str]`, *optional*):
            Regular expressions of parameter names to leave out of the selection.
        objective (`str`, defaults to `"auto"`):
            How gradients are taken: `"masked_lm"`, `"causal_lm"`, `"auto"` (from the base model's class when
            wrapping) or `"auxiliary_mlm"` (a causal LM whose gradients come from a trained masked-prediction head
            that also reads the right context; see `gradiend_hf.aux_head`).

        > Pruning (run by GradiendTrainer)

        pre_prune (`float` or `int`, *optional*):
            Before training keep this fraction (0 < x <= 1) or count (int >= 1) of the selected entries with the
            largest |mean gradient| of the source. Until then the model holds a shapes-only placeholder: the dense
            bottleneck is never allocated.
        pre_prune_rows (`int`, defaults to `32`):
            Training rows (stratified by transition) the pre-pruning importance is estimated from.
        post_prune (`float` or `int`, *optional*):
            After the best checkpoint is loaded keep this fraction or count of the adapter's entries.
        post_prune_by (`str`, defaults to `"decoder"`):
            Post-pruning criterion: `"decoder"` |W_d|, `"encoder"` |W_e|, `"decoder_bias"` |b_d| or `"decoder_sum"`
            |W_d + b_d|.

        > Written by training and evaluation (read back on load)

        encoder_bias (`list[float]`, *optional*):
            The trained encoder bias b_e, one value per latent unit.
        feature_factor (`float` or `list[float]`, *optional*):
            The chosen edit's feature value h fed to the decoder; `merge_and_unload()` without arguments uses it.
        learning_rate (`float`, *optional*):
            The chosen edit's step size: theta' = theta + learning_rate * dec(feature_factor). Set both or neither.
        evaluation (`dict`, *optional*):
            Figures recorded with the chosen edit (metrics, LMS before and after), shown on the model card.
        pruning (`list[dict]`, *optional*):
            The pruning steps applied, in order (method, keep, kept, total, cutoff, ...).
        parameters (`list[str]`, *optional*):
            The base parameters the saved adapter covers, in model order. Every loader (GradiendModel and the PEFT
            routes) requires exactly these on the base and in the weights file, so an adapter for a deeper model never
            applies part of its edit silently.
        kept_entries (`dict[str, int]`, *optional*):
            Per parameter of a pruned adapter, the number of entries it keeps; written on save. transformers' loaders
            size the adapter's tensors from the config before they read the file, so they need it.

    Inherited from `PeftConfig`: `base_model_name_or_path` (filled in from the base model when wrapping), `revision`,
    `task_type`, `inference_mode`.

    Example:

        >>> from gradiend_hf import GradiendConfig
        >>> config = GradiendConfig(feature_classes=["female", "male"], pre_prune=0.01)
        >>> config.with_updates(feature_factor=0.0, learning_rate=1e-3).learning_rate
        0.001
    """

    feature_classes: list[str] = field(
        default=None,
        metadata={
            "help": "The two feature classes, in order: the first reads +1 on the feature neuron, the second -1."
        },
    )
    latent_dim: int = field(default=1, metadata={"help": "Size of the bottleneck (1 = one feature neuron)."})
    encoder_activation: str = field(default="tanh", metadata={"help": f"One of {ENCODER_ACTIVATIONS}."})
    decoder_activation: str = field(default="identity", metadata={"help": f"One of {DECODER_ACTIVATIONS}."})
    decoder_bias: bool = field(
        default=True, metadata={"help": "Learn a decoder bias b_d (the 'debias' direction at h=0)."}
    )
    source: str = field(
        default="alternative",
        metadata={"help": "Gradient the encoder reads: 'factual', 'alternative' or 'diff' (factual - alternative)."},
    )
    target: str = field(
        default="diff", metadata={"help": "Gradient the decoder reconstructs: 'factual', 'alternative' or 'diff'."}
    )
    target_parameters: Optional[list[str]] = field(
        default=None,
        metadata={
            "help": "Regular expressions (re.search) over base parameter names to read and edit. None = all backbone "
            "parameters including embeddings, excluding the LM head and anything tied to it."
        },
    )
    exclude_parameters: Optional[list[str]] = field(
        default=None, metadata={"help": "Regular expressions of parameter names to leave out of the selection."}
    )
    objective: str = field(
        default="auto",
        metadata={
            "help": "'masked_lm', 'causal_lm', or 'auto' (resolved from the base model class when wrapping); "
            "'auxiliary_mlm' for a causal LM whose gradients come from an auxiliary masked-prediction head that also "
            "reads the text after [MASK] (see gradiend_hf.aux_head; evaluation and rewriting still use the LM head)."
        },
    )
    init_seed: int = field(default=0, metadata={"help": "Seed of the bottleneck initialisation."})
    encoder_bias: Optional[list[float]] = field(
        default=None, metadata={"help": "Trained encoder bias b_e (one value per latent unit); written on save."}
    )
    feature_factor: Optional[float] = field(
        default=None, metadata={"help": "Chosen edit: feature value fed to the decoder (merge_and_unload default)."}
    )
    learning_rate: Optional[float] = field(
        default=None, metadata={"help": "Chosen edit: step size of theta + lr * dec(feature_factor)."}
    )
    evaluation: Optional[dict] = field(
        default=None, metadata={"help": "Figures recorded with the chosen edit (metrics, LMS before/after)."}
    )
    pre_prune: Optional[Union[float, int]] = field(
        default=None,
        metadata={
            "help": "Pre-pruning (GradiendTrainer, before training): keep this fraction (0 < x <= 1) or count "
            "(int >= 1) of the selected entries with the largest |mean gradient| of the source over `pre_prune_rows` "
            "training rows stratified by transition (see gradiend_hf.pruning.pre_prune). None = no pre-pruning."
        },
    )
    pre_prune_rows: int = field(
        default=32, metadata={"help": "Training rows pre-pruning estimates the importance from."}
    )
    post_prune: Optional[Union[float, int]] = field(
        default=None,
        metadata={
            "help": "Post-pruning (GradiendTrainer, after the best checkpoint is loaded): keep this fraction or "
            "count of the adapter's entries by `post_prune_by` (see gradiend_hf.pruning.post_prune). None = no "
            "post-pruning."
        },
    )
    post_prune_by: str = field(
        default="decoder",
        metadata={"help": f"Post-pruning criterion, one of {POST_PRUNE_CRITERIA}: |W_d|, |W_e|, |b_d| or |W_d + b_d|."},
    )
    pruning: Optional[list] = field(
        default=None,
        metadata={
            "help": "Record of the pruning steps applied (method, keep, kept, total, ...), in order; "
            "written by pruning."
        },
    )
    parameters: Optional[list[str]] = field(
        default=None,
        metadata={
            "help": "The base parameters the saved adapter covers, in model order; written on save. Every loader "
            "(GradiendModel and the PEFT routes) requires exactly these on the base and in the weights file."
        },
    )

    kept_entries: Optional[dict[str, int]] = field(
        default=None,
        metadata={
            "help": "Per parameter of a pruned adapter, the number of entries it keeps; written on save (transformers' "
            "loaders size the adapter's tensors from the config before they read the file)."
        },
    )

    def __post_init__(self) -> None:
        self.peft_type = GradiendType.GRADIEND
        super().__post_init__()
        self._check_types()
        _choice("encoder_activation", self.encoder_activation, ENCODER_ACTIVATIONS)
        _choice("decoder_activation", self.decoder_activation, DECODER_ACTIVATIONS)
        _choice("source", self.source, GRADIENT_KINDS)
        _choice("target", self.target, GRADIENT_KINDS)
        _choice("objective", self.objective, OBJECTIVES)
        _choice("post_prune_by", self.post_prune_by, POST_PRUNE_CRITERIA)
        if self.encoder_bias is not None and len(self.encoder_bias) != self.latent_dim:
            raise ValueError(f"encoder_bias has {len(self.encoder_bias)} values but latent_dim is {self.latent_dim}.")
        if isinstance(self.feature_factor, list) and len(self.feature_factor) != self.latent_dim:
            raise ValueError(
                f"feature_factor has {len(self.feature_factor)} values but latent_dim is {self.latent_dim}; give one "
                "number (used for every latent unit) or one per unit."
            )
        for name in ("pre_prune", "post_prune"):
            value = getattr(self, name)
            if value is None:
                continue
            if (isinstance(value, int) and value < 1) or (isinstance(value, float) and not 0.0 < value <= 1.0):
                raise ValueError(f"{name}={value!r} must be a fraction (0 < x <= 1), a count (int >= 1) or None.")
        if self.pre_prune_rows < 1:
            raise ValueError(f"pre_prune_rows must be a positive integer, got {self.pre_prune_rows!r}.")
        if (self.feature_factor is None) != (self.learning_rate is None):
            raise ValueError("Set both feature_factor and learning_rate for a stored edit, or neither.")

    def _check_types(self) -> None:
        """Every field of the right type before anything reads it: a JSON file saying `"decoder_bias": "false"` or
        `"latent_dim": true` is refused instead of being read as truthy, and patterns must compile."""
        if self.feature_classes is None:
            raise ValueError(
                "GradiendConfig needs feature_classes, e.g. GradiendConfig(feature_classes=['female', 'male'])."
            )
        classes = self.feature_classes
        if isinstance(classes, str) or not isinstance(classes, (list, tuple)) or len(classes) != 2:
            raise ValueError(
                f"feature_classes must be an ordered pair of two class names, got {classes!r}; "
                "the first reads +1 and the second -1."
            )
        if not all(isinstance(c, str) and c.strip() for c in classes):
            raise ValueError(f"feature_classes must be two non-empty strings, got {classes!r}.")
        if classes[0] == classes[1]:
            raise ValueError(f"feature_classes must be two different names, got {classes!r}.")
        self.feature_classes = list(classes)
        _typed("latent_dim", self.latent_dim, int)
        if self.latent_dim < 1:
            raise ValueError(f"latent_dim must be a positive integer, got {self.latent_dim!r}.")
        _typed("decoder_bias", self.decoder_bias, bool)
        _typed("init_seed", self.init_seed, int)
        _typed("pre_prune_rows", self.pre_prune_rows, int)
        for name in ("pre_prune", "post_prune"):
            _typed(name, getattr(self, name), (int, float), optional=True)
        for name in ("encoder_activation", "decoder_activation", "source", "target", "objective", "post_prune_by"):
            _typed(name, getattr(self, name), str)
        for name in ("target_parameters", "exclude_parameters"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = [value]
                setattr(self, name, value)
            _typed(name, value, list, optional=True)
            for pattern in value or []:
                compile_pattern(f"GradiendConfig.{name}", pattern)
        _typed("learning_rate", self.learning_rate, (int, float), optional=True, finite=True)
        if isinstance(self.feature_factor, (list, tuple)):
            for value in self.feature_factor:
                _typed("feature_factor", value, (int, float), finite=True)
            self.feature_factor = list(self.feature_factor)
        else:
            _typed("feature_factor", self.feature_factor, (int, float), optional=True, finite=True)
        _typed("encoder_bias", self.encoder_bias, list, optional=True)
        for value in self.encoder_bias or []:
            _typed("encoder_bias", value, (int, float), finite=True)
        _typed("evaluation", self.evaluation, dict, optional=True)
        _typed("pruning", self.pruning, list, optional=True)
        _typed("parameters", self.parameters, list, optional=True)
        if self.parameters is not None and not all(isinstance(n, str) for n in self.parameters):
            raise ValueError("parameters must be a list of base parameter names (strings).")
        _typed("kept_entries", self.kept_entries, dict, optional=True)
        for name, kept in (self.kept_entries or {}).items():
            _typed(f"kept_entries[{name!r}]", kept, int)
            if kept < 1:
                raise ValueError(f"GradiendConfig.kept_entries[{name!r}]={kept} must be at least 1.")

    # --- JSON round trip -------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["peft_type"] = GradiendType.GRADIEND.value
        if data.get("task_type") is not None:
            data["task_type"] = str(getattr(data["task_type"], "value", data["task_type"]))
        return data

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GradiendConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Unknown GradiendConfig keys {unknown}; known keys are {sorted(known)}.")
        peft_type = data.get("peft_type", GradiendType.GRADIEND.value)
        if str(getattr(peft_type, "value", peft_type)) != GradiendType.GRADIEND.value:
            raise ValueError(f"This adapter config has peft_type={peft_type!r}; a GRADIEND adapter has 'GRADIEND'.")
        data = {k: v for k, v in data.items() if k != "peft_type"}
        return cls(**data)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "GradiendConfig":
        try:
            with open(path, encoding="utf-8") as handle:
                data = json.load(handle)
        except json.JSONDecodeError as error:
            raise ValueError(
                f"{path} is not valid JSON ({error}); the adapter folder is damaged, save it again."
            ) from None
        return cls.from_dict(data)

    @classmethod
    def help(cls) -> str:
        """One line per field: the documentation of every option."""
        own = [f for f in fields(cls) if "help" in f.metadata]
        return "\n".join(f"{f.name}: {f.metadata['help']}" for f in own)

    def pruned_by(self, method: str) -> bool:
        """Whether the recorded pruning steps include one of `method` ('pre' or 'post')."""
        return any(step.get("method") == method for step in self.pruning or [])

    def with_updates(self, **changes: Any) -> "GradiendConfig":
        """A validated copy with some fields changed."""
        data = self.to_dict()
        data.update(changes)
        return type(self).from_dict(data)


def base_name(model: Any) -> Optional[str]:
    """The base model's name or path as its transformers config records it (for `base_model_name_or_path`)."""
    config = getattr(model, "config", None)
    return getattr(config, "_name_or_path", None) or getattr(config, "name_or_path", None) or None
