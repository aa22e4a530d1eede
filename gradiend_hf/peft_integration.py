"""GRADIEND as a PEFT method: load a saved GRADIEND adapter with PEFT or transformers and get the edited model.

After `import gradiend_hf` (which imports this module and calls `register()`), a folder written by
`GradiendModel.save_pretrained` loads the way transformers users load adapters:

    PeftModel.from_pretrained(base, adapter_dir)                 # (a) a PeftModel; merge_and_unload() bakes the edit in
    AutoModelForCausalLM.from_pretrained(adapter_dir)            # (b) transformers reads adapter_config.json and loads
                                                                 #     the base named by base_model_name_or_path
    base.load_adapter(adapter_dir)                               # (c) transformers' own adapter loader

Each wraps every module that owns an edited parameter in a `GradiendLayer`. The layer runs the wrapped module with
its own parameters replaced by p + delta (through `torch.func.functional_call`), so it works for any module type
(Linear, GPT-2 Conv1D, Embedding, LayerNorm, RMSNorm ...). The delta is the stored edit,

    delta[p] = learning_rate * act_d(sum_k ff_k * W_d[p][k] + b_d[p])      (scattered at the kept indices if pruned)

computed with the same operations as `GradiendModel.merge_and_unload`, so logits agree bit for bit in float32.

Why not `peft.register_peft_method`: it only accepts names that already exist in PEFT's closed `PeftType` enum
(`Unknown PEFT type GRADIEND, please add an entry to peft.utils.peft_types.PeftType.`). The registry itself is three
plain dictionaries in `peft.mapping`; `register()` adds one entry to each, keyed by our own enum member
`GradiendType.GRADIEND` (a `str` enum equal to "GRADIEND", as transformers calls `peft_type.value.lower()`).

Paths (b) and (c) keep only the wrapped layers (the tuner object is dropped), so everything the forward pass needs
(W_d, b_d, the kept indices, the feature factor, learning rate and decoder activation) lives on the layers.
"""

from __future__ import annotations

import inspect
import os
import warnings
from contextlib import nullcontext
from typing import Any, Iterable, Mapping, Optional

import torch
from huggingface_hub import hf_hub_download
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_adapters_to_merge
from peft.utils.integrations import init_empty_weights
from torch import nn

from .bottleneck import FeatureValue, edit_update, latent_vector
from .config import CONFIG_NAME, GradiendConfig, GradiendType
from .edit import NonFiniteEdit
from .selection import select_parameters
from .serialization import (
    KINDS,
    WEIGHTS_NAME,
    check_complete,
    check_fits,
    check_objective,
    entry_problems,
    group_adapter_tensors,
)

# PEFT's per-method prefix: file keys read `<module>.gradiend_<kind>.<param>`, layer attributes `gradiend_<kind>`
PREFIX = "gradiend_"


# --- configuration as PEFT loads it ---------------------------------------------------------------------------------
class GradiendPeftConfig(GradiendConfig):
    """`GradiendConfig` as PEFT and transformers create it (the class registered for peft_type "GRADIEND").

    Its `from_pretrained` reads adapter_config.json with a clear error for a damaged file, and accepts
    `feature_factor=`/`learning_rate=` to choose the edit at load time, e.g.
    `PeftModel.from_pretrained(base, path, feature_factor=1.0, learning_rate=0.05)`.
    """

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str,
        subfolder: Optional[str] = None,
        feature_factor: Optional[FeatureValue] = None,
        learning_rate: Optional[float] = None,
        **kwargs: Any,
    ) -> "GradiendPeftConfig":
        repo = str(pretrained_model_name_or_path)
        accepted = inspect.signature(hf_hub_download).parameters
        hub_kwargs = {k: v for k, v in kwargs.items() if k in accepted and k not in ("repo_id", "filename")}
        local = os.path.join(repo, subfolder, CONFIG_NAME) if subfolder else os.path.join(repo, CONFIG_NAME)
        if os.path.isfile(local):
            path = local
        else:
            try:
                path = hf_hub_download(repo, CONFIG_NAME, subfolder=subfolder, **hub_kwargs)
            except Exception as error:
                raise ValueError(f"Can't find '{CONFIG_NAME}' at '{repo}': {error}") from error
        config = cls.from_file(path)
        _require_safetensors(os.path.dirname(path), repo, subfolder, hub_kwargs if path != local else {})
        if feature_factor is not None or learning_rate is not None:
            if feature_factor is None or learning_rate is None:
                raise ValueError("Choose an edit with both feature_factor= and learning_rate=.")
            config = config.with_updates(feature_factor=feature_factor, learning_rate=float(learning_rate))
        return config


def _require_safetensors(folder: str, repo: str, subfolder: Optional[str], hub_kwargs: dict[str, Any]) -> None:
    """PEFT falls back to adapter_model.bin (a pickle) when the safetensors file is missing; GRADIEND never reads
    one."""
    if os.path.isfile(os.path.join(folder, WEIGHTS_NAME)):
        return
    if not hub_kwargs and os.path.isdir(repo):
        found = sorted(os.listdir(folder))
        raise ValueError(
            f"{folder} has no {WEIGHTS_NAME} (found {found}). GRADIEND adapters load from safetensors only; a .bin "
            "file is a pickle and is never read. Save the adapter again with GradiendModel.save_pretrained."
        )
    try:
        hf_hub_download(repo, WEIGHTS_NAME, subfolder=subfolder, **hub_kwargs)
    except Exception as error:
        raise ValueError(
            f"Can't find '{WEIGHTS_NAME}' at '{repo}' ({error}). GRADIEND adapters load from safetensors only; a .bin "
            "file is a pickle and is never read."
        ) from error


# --- the layer ------------------------------------------------------------------------------------------------------
class _Entries(nn.Module):
    """The tensors of one adapter on one layer, named by the wrapped module's own parameter names (weight, bias...).

    Float kinds (encoder, decoder, offset) are parameters, the pruning indices (int64) are buffers. Tensors created
    before the adapter file is read carry a `_gradiend_placeholder` mark, dropped when they are loaded (PEFT copies
    into them) or replaced (transformers assigns new parameters); a delta is never computed from a placeholder.
    """

    def __init__(self, tensors: Mapping[str, torch.Tensor], buffers: bool = False, placeholder: bool = False) -> None:
        super().__init__()
        self.as_buffers = buffers
        for local, tensor in tensors.items():
            self.put(local, tensor, placeholder=placeholder)

    def put(self, local: str, tensor: torch.Tensor, placeholder: bool = False) -> None:
        if local in self._parameters:
            del self._parameters[local]
        if local in self._buffers:
            del self._buffers[local]
        if self.as_buffers:
            self.register_buffer(local, tensor)
        else:
            self.register_parameter(local, nn.Parameter(tensor, requires_grad=False))
        if placeholder:
            self.get(local)._gradiend_placeholder = True

    def get(self, local: str) -> Optional[torch.Tensor]:
        return self._buffers.get(local) if self.as_buffers else self._parameters.get(local)


class GradiendLayer(nn.Module, BaseTunerLayer):
    """Wraps one base module; applies p + delta to the module's own (direct) parameters that the adapter edits.

    Per adapter name the layer holds `gradiend_encoder/decoder/offset[adapter].<param>` (float tensors),
    `gradiend_index[adapter].<param>` (kept flat indices, pruned adapters only) and `gradiend_config[adapter]` (the
    adapter's GradiendConfig: the stored edit, decoder activation and latent size are read from it, never copied). A
    parameter tied to an edited parameter of another layer (GPT-2 `lm_head.weight` = `wte.weight`) is listed in
    `gradiend_tied[adapter]` and takes its delta from that layer, so the unmerged model behaves like the merged one; on
    merge only the owning layer writes (the storage is shared).
    """

    adapter_layer_names = ("gradiend_encoder", "gradiend_decoder", "gradiend_offset")
    other_param_names = ("gradiend_index", "gradiend_config", "gradiend_tied")

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: GradiendConfig, **spec: Any) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.gradiend_encoder = nn.ModuleDict()
        self.gradiend_decoder = nn.ModuleDict()
        self.gradiend_offset = nn.ModuleDict()
        self.gradiend_index = nn.ModuleDict()
        self.gradiend_config: dict[str, GradiendConfig] = {}
        self.gradiend_tied: dict[str, dict[str, tuple[GradiendLayer, str]]] = {}
        # (adapter, parameter) -> identity and version of the tensors that passed the validator (re-checked on change)
        self._checked: dict[tuple[str, str], tuple] = {}
        self._active_adapter = adapter_name
        self.merged_adapters: list[str] = []
        self._disable_adapters = False
        # The adapter tensors of a layer nested inside this one are named by their clean path (no `base_layer`), as
        # in the file: transformers' loaders match file keys against state_dict() and resolve them by attribute.
        self.register_state_dict_post_hook(_name_nested_adapter_keys_cleanly)
        self.register_load_state_dict_pre_hook(_route_nested_adapter_keys_to_base_layer)
        self.update_layer(adapter_name, config, **spec)

    # --- construction ------------------------------------------------------------------------------------------
    def update_layer(
        self,
        adapter_name: str,
        config: GradiendConfig,
        own: Optional[Mapping[str, tuple[torch.Size, Optional[int]]]] = None,
        tied: Optional[Mapping[str, tuple["GradiendLayer", str]]] = None,
    ) -> None:
        """Add an adapter: `own` maps a local parameter name to (entry shape, number of kept entries or None)."""
        base = self.get_base_layer()
        latent = config.latent_dim
        encoder, decoder, offset, index = {}, {}, {}, {}
        for local, (shape, kept) in (own or {}).items():
            p = base._parameters[local]
            entries = torch.Size([kept]) if kept is not None else torch.Size(shape)
            encoder[local] = torch.zeros((latent, *entries), device=p.device)
            decoder[local] = torch.zeros((latent, *entries), device=p.device)
            if config.decoder_bias:
                offset[local] = torch.zeros(entries, device=p.device)
            if kept is not None:
                index[local] = torch.zeros(kept, dtype=torch.long, device=p.device)
        if own:
            self.gradiend_encoder[adapter_name] = _Entries(encoder)
            self.gradiend_decoder[adapter_name] = _Entries(decoder, placeholder=True)
            if offset:
                self.gradiend_offset[adapter_name] = _Entries(offset, placeholder=True)
            self.gradiend_index[adapter_name] = _Entries(index, buffers=True)
        if tied:
            self.gradiend_tied[adapter_name] = dict(tied)
        self.gradiend_config[adapter_name] = config
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, error_msgs):
        """Check the file's tensors against the base parameters and adopt their shapes (a pruned adapter keeps k
        entries per parameter, which is unknown before the file is read), then let torch copy them in."""
        base = self.get_base_layer()
        incoming: dict[tuple[str, str], dict[str, tuple[str, torch.Tensor]]] = {}
        for key, value in state_dict.items():
            parts = key[len(prefix):].split(".") if key.startswith(prefix + PREFIX) else []
            if len(parts) != 3:
                continue
            attribute, adapter, local = parts
            kind = attribute[len(PREFIX):]
            if kind in KINDS and adapter in self.gradiend_config and local in base._parameters:
                incoming.setdefault((adapter, local), {})[kind] = (key, value)
        for (adapter, local), found in list(incoming.items()):
            p, config = base._parameters[local], self.gradiend_config[adapter]
            tensors = {kind: value for kind, (_, value) in found.items()}
            wrong = entry_problems(prefix + local, p, tensors, config.latent_dim, config.decoder_bias)
            if wrong:
                error_msgs.append(
                    f"The GRADIEND adapter does not fit this base model: {'; '.join(wrong)}. Load it onto the base "
                    "model it was made for."
                )
                del incoming[(adapter, local)]
                continue
            for kind, (key, value) in found.items():
                container = getattr(self, PREFIX + kind)
                if adapter not in container:
                    container[adapter] = _Entries({}, buffers=kind == "index")
                holder = container[adapter]
                current = holder.get(local)
                if current is None or current.shape != value.shape:
                    device = current.device if current is not None else p.device
                    dtype = torch.long if holder.as_buffers else getattr(current, "dtype", torch.float32)
                    holder.put(local, torch.zeros(value.shape, dtype=dtype, device=device), placeholder=kind != "index")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, error_msgs)
        for (adapter, local), found in incoming.items():
            for kind in found:
                container = getattr(self, PREFIX + kind)
                tensor = container[adapter].get(local) if adapter in container else None
                if tensor is not None and "_gradiend_placeholder" in tensor.__dict__:
                    del tensor._gradiend_placeholder

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: Optional[torch.device] = None) -> None:
        """Move this adapter's tensors to the base layer's device; never cast them to the base dtype (keeps fp32)."""
        if device is None:
            device = next((p.device for p in self.get_base_layer().parameters(recurse=False)), None)
        if device is None:
            return
        for name in (PREFIX + k for k in KINDS):
            container = getattr(self, name)
            if adapter_name not in container:
                continue
            if not any(t.device.type == "meta" for t in container[adapter_name].state_dict().values()):
                container[adapter_name].to(device)

    # --- the edit ---------------------------------------------------------------------------------------------------
    def has_edit(self, adapter_name: str) -> bool:
        config = self.gradiend_config.get(adapter_name)
        return config is not None and config.feature_factor is not None and config.learning_rate is not None

    def gradiend_delta(self, adapter_name: str, local: str) -> Optional[torch.Tensor]:
        """lr * act_d(ff . W_d + b_d) for one own parameter (its kept entries), float32; None without a stored edit."""
        if not self.has_edit(adapter_name) or adapter_name not in self.gradiend_decoder:
            return None
        weight = self.gradiend_decoder[adapter_name].get(local)
        if weight is None:
            return None
        bias = self.gradiend_offset[adapter_name].get(local) if adapter_name in self.gradiend_offset else None
        if any(getattr(t, "_gradiend_placeholder", False) for t in (weight, bias)):
            raise RuntimeError(
                f"The GRADIEND decoder tensors of adapter '{adapter_name}' for parameter '{local}' of "
                f"{type(self.get_base_layer()).__name__} were never loaded from the adapter file: the adapter was made "
                "for another base model or its file is incomplete (see the loader's report of missing keys). PEFT and "
                "transformers only load saved GRADIEND adapters; train new ones with GradiendModel."
            )
        self._check_loaded(adapter_name, local)
        config = self.gradiend_config[adapter_name]
        h = latent_vector(config.feature_factor, config.latent_dim, weight.device)
        return edit_update(weight, bias, h, config.decoder_activation, config.learning_rate)

    def _check_loaded(self, adapter_name: str, local: str) -> None:
        """The loaded tensors pass the one validator (serialization.entry_problems) before their first use.

        PEFT's route runs it while loading (_load_from_state_dict); transformers' routes assign the tensors without
        that hook, so the check runs here, once per tensor set, before any delta is computed from them."""
        tensors = {}
        for kind in KINDS:
            container = getattr(self, PREFIX + kind)
            tensor = container[adapter_name].get(local) if adapter_name in container else None
            if tensor is not None:
                tensors[kind] = tensor
        signature = tuple((kind, id(t), t._version) for kind, t in tensors.items())
        if self._checked.get((adapter_name, local)) == signature:
            return
        tensors = {kind: t.detach() for kind, t in tensors.items()}
        config = self.gradiend_config[adapter_name]
        base = self.get_base_layer()._parameters[local]
        problems = entry_problems(local, base, tensors, config.latent_dim, config.decoder_bias)
        if problems:
            raise RuntimeError(
                f"The GRADIEND adapter '{adapter_name}' does not fit this base model: {'; '.join(problems)}. Load it "
                "onto the base model it was made for, or save it again."
            )
        self._checked[(adapter_name, local)] = signature

    def gradiend_indices(self, adapter_name: str, local: str) -> Optional[torch.Tensor]:
        holder = self.gradiend_index[adapter_name] if adapter_name in self.gradiend_index else None
        return None if holder is None else holder.get(local)

    def edited(self, value: torch.Tensor, adapter_name: str, local: str) -> torch.Tensor:
        """`value` (a parameter-shaped tensor) with this adapter's delta for `local` applied, in value's dtype."""
        tied = self.gradiend_tied.get(adapter_name, {})
        if local in tied:
            source, source_local = tied[local]
            return source.edited(value, adapter_name, source_local)
        delta = self.gradiend_delta(adapter_name, local)
        if delta is None:
            return value
        idx = self.gradiend_indices(adapter_name, local)
        if idx is None:
            kept = (value.float() + delta.reshape(value.shape).to(value.device)).to(value.dtype)
        else:
            kept = (value.reshape(-1).index_select(0, idx).float() + delta.to(value.device)).to(value.dtype)
        if not bool(torch.isfinite(kept).all()):
            config = self.gradiend_config[adapter_name]
            raise NonFiniteEdit(local, config.feature_factor, config.learning_rate, value.dtype)
        return kept if idx is None else value.reshape(-1).index_copy(0, idx, kept).reshape(value.shape)

    def edited_locals(self, adapter_name: str) -> list[str]:
        own = []
        if adapter_name in self.gradiend_decoder:
            own = [n for n, _ in self.gradiend_decoder[adapter_name].named_parameters(recurse=False)]
        return own + [n for n in self.gradiend_tied.get(adapter_name, {}) if n not in own]

    def _require_edit(self, adapter_name: str) -> None:
        if not self.has_edit(adapter_name):
            raise ValueError(
                f"The GRADIEND adapter '{adapter_name}' has no stored edit (feature_factor and learning_rate are null "
                "in its adapter_config.json), so there is nothing to merge. Choose one with "
                "gradiend_hf.peft_integration.set_gradiend_edit(model, feature_factor=..., learning_rate=...) or load "
                "with PeftModel.from_pretrained(base, path, feature_factor=..., learning_rate=...)."
            )

    # --- PEFT's layer protocol ----------------------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(*args, **kwargs)
        replaced = self.edited_parameters()
        if not replaced:
            return self.base_layer(*args, **kwargs)
        return torch.func.functional_call(self.base_layer, replaced, args, kwargs)

    def edited_parameters(self, only: Optional[str] = None) -> dict[str, torch.Tensor]:
        """The wrapped module's own parameters as the active, unmerged adapters edit them (all, or just `only`)."""
        if self.disable_adapters or self.merged:
            return {}
        base = self.get_base_layer()
        replaced: dict[str, torch.Tensor] = {}
        for adapter_name in self.active_adapters:
            if adapter_name not in self.gradiend_config:
                continue
            for local in self.edited_locals(adapter_name):
                if only is None or local == only:
                    current = replaced.get(local, base._parameters[local])
                    replaced[local] = self.edited(current, adapter_name, local)
        return replaced

    def edited_parameter(self, local: str) -> torch.Tensor:
        """`base_layer.<local>` with the edit: what a model reading the parameter directly (DeBERTa-v2 reads
        `rel_embeddings.weight`, T5 `wo.weight`) must see, as it never runs this layer's forward."""
        return self.edited_parameters(only=local).get(local, self.get_base_layer()._parameters[local])

    @property
    def weight(self) -> torch.Tensor:
        return self.edited_parameter("weight")

    @property
    def bias(self) -> Optional[torch.Tensor]:
        base = self.get_base_layer()
        return self.edited_parameter("bias") if base._parameters.get("bias") is not None else None

    def __getattr__(self, name: str) -> Any:
        """Other direct parameters of the wrapped module (e.g. a custom `scale`) read through the edit too, and its
        submodules are reached by their clean path (`get_submodule("P.C")` with P wrapped), as the file names them."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = self._modules.get("base_layer")
            if base is not None and base._parameters.get(name) is not None:
                return self.edited_parameter(name)
            if base is not None and name in base._modules:
                return base._modules[name]
            raise

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """p += delta in place (same arithmetic as GradiendModel.merge_and_unload). Tied parameters share storage, so
        only the owning layer writes; a layer that merely follows a tied parameter records the merge."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        base = self.get_base_layer()
        for adapter_name in adapter_names:
            if adapter_name not in self.gradiend_config:
                continue
            self._require_edit(adapter_name)
            own = [n for n in self.edited_locals(adapter_name) if n not in self.gradiend_tied.get(adapter_name, {})]
            with torch.no_grad():
                for local in own:
                    p = base._parameters[local]
                    new = self.edited(p.detach(), adapter_name, local)
                    if safe_merge and not torch.isfinite(new).all():
                        raise ValueError(f"NaN or inf in the merged {local} of adapter '{adapter_name}'; not merged.")
                    p.data.copy_(new)
            self.merged_adapters.append(adapter_name)

    def unload_and_optionally_merge_module(
        self, merge: bool = True, safe_merge: bool = False, adapter_names: Optional[list[str]] = None
    ) -> nn.Module:
        """The wrapped module, with the layers nested inside it unwrapped first (deepest first) and every edit merged
        if `merge`. PEFT's unloading calls this; it never visits modules inside a tuner layer, so a nested layer would
        otherwise stay behind, still adding its delta to a 'plain' model."""
        nested = [(n, m) for n, m in self.base_layer.named_modules() if isinstance(m, GradiendLayer)]
        for path, inner in reversed(nested):
            parent_path, name = _split(path)
            plain = inner.unload_and_optionally_merge_module(merge, safe_merge, adapter_names)
            setattr(self.base_layer.get_submodule(parent_path), name, plain)
        if merge:
            self.merge(safe_merge=safe_merge, adapter_names=adapter_names)
        return self.get_base_layer()

    def unmerge(self) -> None:
        """p -= delta in place (exact up to floating-point rounding, as for LoRA)."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        base = self.get_base_layer()
        while self.merged_adapters:
            adapter_name = self.merged_adapters.pop()
            tied = self.gradiend_tied.get(adapter_name, {})
            with torch.no_grad():
                for local in self.edited_locals(adapter_name):
                    if local in tied:  # the owning layer restores the shared storage
                        continue
                    p = base._parameters[local]
                    delta = self.gradiend_delta(adapter_name, local)
                    if delta is None:
                        continue
                    idx = self.gradiend_indices(adapter_name, local)
                    if idx is None:
                        p.data.copy_((p.detach().float() - delta.reshape(p.shape)).to(p.dtype))
                    else:
                        flat = p.data.view(-1)
                        flat.index_copy_(0, idx, (flat.index_select(0, idx).float() - delta).to(p.dtype))

    def __repr__(self) -> str:
        return "gradiend." + super().__repr__()


_CONTAINERS = frozenset(PREFIX + kind for kind in KINDS)


def _is_adapter_key(key: str) -> bool:
    """True for `<path>.gradiend_<kind>.<adapter>.<param>`: a tensor of a GRADIEND layer, not of the base model."""
    parts = key.split(".")
    return len(parts) >= 3 and parts[-3] in _CONTAINERS


def _holds_nested_layers(module: nn.Module) -> bool:
    """Whether a GRADIEND layer sits inside this layer's wrapped module (only then do the key hooks have work)."""
    return any(isinstance(m, GradiendLayer) for m in module._modules["base_layer"].modules())


def _name_nested_adapter_keys_cleanly(module: nn.Module, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    """state_dict post-hook: `<prefix>base_layer.<child>...gradiend_<kind>...` -> `<prefix><child>...` (order kept)."""
    if not _holds_nested_layers(module):
        return
    inner = prefix + "base_layer."
    renamed = {k: prefix + k[len(inner):] for k in state_dict if k.startswith(inner) and _is_adapter_key(k)}
    if renamed:
        items = list(state_dict.items())
        state_dict.clear()
        state_dict.update((renamed.get(k, k), v) for k, v in items)


def _route_nested_adapter_keys_to_base_layer(module: nn.Module, state_dict: dict, prefix: str, *_: Any) -> None:
    """load_state_dict pre-hook, the inverse of the post-hook: a clean key of a nested layer's adapter tensor goes to
    `<prefix>base_layer.<child>...`, where the nested layer lives."""
    if not _holds_nested_layers(module):
        return
    children = module._modules["base_layer"]._modules
    for key in [k for k in state_dict if k.startswith(prefix)]:
        relative = key[len(prefix):]
        if relative.split(".", 1)[0] in children and _is_adapter_key(relative):
            state_dict[f"{prefix}base_layer.{relative}"] = state_dict.pop(key)


# --- the tuner ------------------------------------------------------------------------------------------------------
def _layer_paths(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, GradiendLayer)]


def _clean(name: str, layers: Iterable[str]) -> Optional[str]:
    """A parameter/module name as it reads without our wrappers (None for our own adapter tensors)."""
    for path in layers:
        wrapped = f"{path}.base_layer"
        if name == wrapped or name.startswith(wrapped + "."):
            return path + name[len(wrapped):]
        if name.startswith(f"{path}.{PREFIX}"):
            return None
    return name


class _UnwrappedView:
    """The model as `select_parameters` sees it before any GRADIEND layer was injected (for a second adapter)."""

    def __init__(self, model: nn.Module) -> None:
        layers = _layer_paths(model)
        self._model = model
        self._named = [(c, p) for n, p in model.named_parameters() if (c := _clean(n, layers)) is not None]

    def named_parameters(self, *args: Any, **kwargs: Any):
        return iter(self._named)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)


def _modules_by_clean_path(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path without our wrappers, module) for every base module, duplicates (shared modules) included."""
    layers = _layer_paths(model)
    result = []
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, GradiendLayer):
            continue
        clean = _clean(name, layers)
        if clean is not None:
            result.append((clean, module))
    return result


def _split(name: str) -> tuple[str, str]:
    module, _, local = name.rpartition(".")
    return module, local


def _targets_from_state_dict(
    grouped: Mapping[str, Mapping[str, torch.Tensor]]
) -> dict[str, tuple[torch.Size, Optional[int]]]:
    """Parameter name -> (entry shape, kept count or None) of checked adapter tensors (see check_fits)."""
    return {
        name: (torch.Size(t["decoder"].shape[1:]), t["index"].numel() if "index" in t else None)
        for name, t in grouped.items()
    }


def _recorded_parameters(view: Any, config: GradiendConfig, shapes: Mapping[str, torch.Tensor]) -> list[str]:
    """The parameters the saved adapter covers (`config.parameters`), all of which the base must have; adapters
    saved before that field existed are selected by their patterns."""
    if config.parameters is None:
        return select_parameters(view, config.target_parameters, config.exclude_parameters)
    absent = [n for n in config.parameters if n not in shapes]
    if absent:
        made_for = config.base_model_name_or_path or "another base model"
        raise ValueError(
            f"This GRADIEND adapter edits {len(config.parameters)} parameters of {made_for}; this base model lacks "
            f"{absent[:3]}{' ...' if len(absent) > 3 else ''}. Load it onto the base model it was made for."
        )
    return list(config.parameters)


class GradiendTuner(BaseTuner):
    """PEFT tuner for GRADIEND adapters: wraps each module that owns an edited parameter in a `GradiendLayer`.

    The edited parameters are chosen exactly as GradiendModel chooses them (`target_parameters`/`exclude_parameters`
    of the config through `select_parameters`), or from the adapter tensors when PEFT passes them (`state_dict`).
    """

    prefix: str = PREFIX
    tuner_layer_cls = GradiendLayer
    target_module_mapping: dict[str, list[str]] = {}

    def _prepare_adapter_config(self, peft_config: GradiendConfig, model_config: dict) -> GradiendConfig:
        return peft_config

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        """Our tensors found by their structure (`...gradiend_<kind>.<adapter>.<param>`): PEFT's version matches the
        layers' module paths, which hold `base_layer` for a nested layer, while state_dict() names it cleanly."""
        return {key: value for key, value in state_dict.items() if _is_adapter_key(key)}

    def _check_merge_allowed(self) -> None:
        """PEFT warns when a tied embedding is targeted; here merging is safe: the owning layer writes the shared
        storage once and the tied layer only follows, so the weights stay tied and the edit is applied once."""

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """File keys `<module>.gradiend_<kind>.<param>` -> model keys `<module>.gradiend_<kind>.<adapter>.<param>`.

        PEFT's default only maps keys the model already has; the pruning indices of a pruned adapter are not known
        before the file is read, so every GRADIEND key is mapped here (the layer adopts the shapes on loading).
        """
        check_complete(config, group_adapter_tensors(state_dict))
        remapped = {}
        for key, value in state_dict.items():
            head, marker, tail = key.rpartition("." + PREFIX)
            kind, _, local = tail.partition(".")
            if marker and kind in KINDS and local and "." not in local:
                key = f"{head}.{PREFIX}{kind}.{adapter_name}.{local}"
            remapped[key] = value
        return remapped

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        """Unloading puts the wrapped module itself back (PEFT's version copies `.weight` across, which a wrapped
        module without a `weight` of its own, e.g. ConvBERT's SeparableConv1D, does not have)."""
        setattr(parent, child_name, new_module)

    def _create_and_replace(self, peft_config, adapter_name, target, target_name, parent, current_key, **spec):
        if isinstance(target, GradiendLayer):
            target.update_layer(adapter_name, peft_config, **spec)
            return target
        if isinstance(target, BaseTunerLayer):
            raise NotImplementedError(
                f"{current_key} is already wrapped by another PEFT method ({type(target).__name__}); GRADIEND layers "
                "cannot be stacked on other adapters."
            )
        layer = GradiendLayer(target, adapter_name, peft_config, **spec)
        setattr(parent, target_name, layer)
        return layer

    def inject_adapter(
        self,
        model: nn.Module,
        adapter_name: str,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        state_dict: Optional[dict[str, torch.Tensor]] = None,
    ) -> None:
        """PEFT's module matching (LoRA-style `target_modules`) replaced by GRADIEND's parameter selection."""
        config = self.peft_config[adapter_name]
        if not isinstance(config, GradiendConfig):
            raise TypeError(f"A GRADIEND adapter needs a GradiendConfig, got {type(config).__name__}.")
        if config.encoder_bias is None and state_dict is None:
            raise ValueError(
                "This GradiendConfig belongs to no trained adapter (it has no encoder_bias, which saving writes): PEFT "
                "and transformers only load saved GRADIEND adapters. Create and train one with "
                "gradiend_hf.get_gradiend_model(base, config) and GradiendTrainer (not peft.get_peft_model), save it, "
                "then load it with PeftModel.from_pretrained(base, adapter_dir)."
            )
        layers = _layer_paths(model)
        view = _UnwrappedView(model) if layers else model
        if state_dict is not None:
            grouped = group_adapter_tensors(state_dict)
            check_fits(view, config, grouped)
            specs = _targets_from_state_dict(grouped)
        else:
            shapes = dict(view.named_parameters())
            names = _recorded_parameters(view, config, shapes)
            kept = config.kept_entries or {}  # a pruned adapter's sizes, so that transformers' loaders fit the file
            specs = {n: (shapes[n].shape, kept.get(n)) for n in names}
        check_objective(model, config)
        if not specs:
            raise ValueError("This GRADIEND adapter selects no base parameter; nothing to inject.")

        modules = _modules_by_clean_path(model)
        by_path = {}
        for path, module in modules:
            by_path.setdefault(path, module)
        own: dict[str, dict[str, tuple[torch.Size, Optional[int]]]] = {}
        sources: dict[int, tuple[str, str]] = {}
        for name, spec in specs.items():
            path, local = _split(name)
            module = by_path.get(path)
            if not path or module is None or local not in module._parameters:
                raise ValueError(
                    f"The GRADIEND adapter edits {name!r}, which is not a parameter of a submodule of this "
                    f"{type(model).__name__}; it was made for another base model."
                )
            own.setdefault(path, {})[local] = spec
            sources[id(module._parameters[local])] = (path, local)
        tied: dict[str, dict[str, tuple[str, str]]] = {}
        for path, module in modules:
            for local, p in module._parameters.items():
                source = sources.get(id(p)) if p is not None else None
                if source is not None and source != (path, local) and local not in own.get(path, {}):
                    tied.setdefault(path, {})[local] = source

        if not (config.feature_factor is not None and config.learning_rate is not None):
            warnings.warn(
                f"The GRADIEND adapter '{adapter_name}' has no stored edit (feature_factor/learning_rate are null): "
                "the model behaves as the unedited base until you choose one with gradiend_hf.peft_integration."
                "set_gradiend_edit(model, feature_factor=..., learning_rate=...).",
                UserWarning,
                stacklevel=2,
            )

        context = init_empty_weights if low_cpu_mem_usage else nullcontext
        created: dict[str, GradiendLayer] = {}
        for path in list(own) + [p for p in tied if p not in own]:
            parent_path, target_name = _split(path)
            parent = model.get_submodule(parent_path)  # a clean path reaches through our wrappers
            while isinstance(parent, GradiendLayer):  # the parent's own parameters are edited too: nest inside it
                parent = parent.base_layer
            target = getattr(parent, target_name)
            with context():
                created[path] = self._create_and_replace(
                    config, adapter_name, target, target_name, parent, current_key=path, own=own.get(path)
                )
            if path not in self.targeted_module_names:
                self.targeted_module_names.append(path)
        for path, entries in tied.items():
            layer = created[path]
            layer.gradiend_tied[adapter_name] = {local: (created[src], name) for local, (src, name) in entries.items()}

        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)
        self._mark_only_adapters_as_trainable(model)
        if config.inference_mode:
            for layer in created.values():
                layer.requires_grad_(False)


# --- helpers for users ------------------------------------------------------------------------------------------------
def gradiend_layers(model: nn.Module) -> list[GradiendLayer]:
    return [m for m in model.modules() if isinstance(m, GradiendLayer)]


def set_gradiend_edit(
    model: nn.Module, feature_factor: FeatureValue, learning_rate: float, adapter_name: Optional[str] = None
) -> None:
    """Choose the edit of a loaded GRADIEND adapter (PeftModel or a transformers model with a loaded adapter).

    Updates every layer and the adapter's config (so a later `save_pretrained` stores the new edit). The adapter must
    not be merged.
    """
    layers = gradiend_layers(model)
    if not layers:
        raise ValueError("This model holds no GRADIEND adapter layers; load one (e.g. PeftModel.from_pretrained).")
    names = {n for layer in layers for n in layer.gradiend_config}
    if adapter_name is None:
        if len(names) != 1:
            raise ValueError(f"The model holds several GRADIEND adapters {sorted(names)}; pass adapter_name=.")
        adapter_name = next(iter(names))
    if adapter_name not in names:
        raise ValueError(f"No GRADIEND adapter named {adapter_name!r}; loaded: {sorted(names)}.")
    if any(adapter_name in layer.merged_adapters for layer in layers):
        raise ValueError(f"The GRADIEND adapter {adapter_name!r} is merged; unmerge it before changing the edit.")
    current = next(layer.gradiend_config[adapter_name] for layer in layers if adapter_name in layer.gradiend_config)
    chosen = current.with_updates(feature_factor=feature_factor, learning_rate=float(learning_rate))
    for layer in layers:
        if adapter_name in layer.gradiend_config:
            layer.gradiend_config[adapter_name] = chosen
    configs = getattr(model, "peft_config", None)
    if isinstance(configs, dict) and adapter_name in configs:
        configs[adapter_name] = chosen


def merge_and_unload_gradiend(model: nn.Module, safe_merge: bool = False) -> nn.Module:
    """Merge the active GRADIEND adapter into the weights and remove the layers; also for paths (b) and (c), where
    transformers offers no merge. For a PeftModel this is `model.merge_and_unload()`."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        return model.merge_and_unload(safe_merge=safe_merge)
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, GradiendLayer)]
    outermost = [(n, m) for n, m in layers if not any(n.startswith(f"{other}.") for other, _ in layers)]
    for name, layer in outermost:  # each unwraps and merges the layers nested inside it first
        parent_name, child = _split(name)
        plain = layer.unload_and_optionally_merge_module(safe_merge=safe_merge)
        setattr(model.get_submodule(parent_name), child, plain)
    if hasattr(model, "peft_config"):
        del model.peft_config
    if hasattr(model, "_hf_peft_config_loaded"):
        model._hf_peft_config_loaded = False
    return model


# --- registration ---------------------------------------------------------------------------------------------------
def register() -> None:
    """Add GRADIEND to PEFT's registry (idempotent). Called at `import gradiend_hf`.

    PEFT's official `register_peft_method` refuses names outside its own `PeftType` enum, so the three mapping
    dictionaries of `peft.mapping` get one entry each, keyed by `GradiendType.GRADIEND`.
    """
    from peft import mapping

    from .compatibility import explain_adapter_api_blocker

    key = GradiendType.GRADIEND
    explain_adapter_api_blocker()
    mapping.PEFT_TYPE_TO_CONFIG_MAPPING[key] = GradiendPeftConfig
    mapping.PEFT_TYPE_TO_TUNER_MAPPING[key] = GradiendTuner
    mapping.PEFT_TYPE_TO_PREFIX_MAPPING[key] = PREFIX


def is_registered() -> bool:
    from peft import mapping

    key = GradiendType.GRADIEND
    return (
        mapping.PEFT_TYPE_TO_CONFIG_MAPPING.get(key) is not None
        and mapping.PEFT_TYPE_TO_TUNER_MAPPING.get(key) is not None
        and mapping.PEFT_TYPE_TO_PREFIX_MAPPING.get(key) == PREFIX
    )


register()
