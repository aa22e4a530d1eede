"""Adapter files, the one place for them: the on-disk format (PEFT's layout), resolving a local folder or Hub repo,
parsing the tensors and checking that they fit a base model. Every load path (GradiendModel.from_pretrained, checkpoint
reloads, comparison, PEFT and transformers) reads through here. Atomic saves: atomic.py.

adapter_model.safetensors keys: `base_model.model.<module path>.gradiend_<kind>.<parameter's own name>`, e.g.
`base_model.model.model.layers.0.mlp.up_proj.gradiend_decoder.weight` for the decoder tensor of base parameter
`model.layers.0.mlp.up_proj.weight`. Kinds: encoder (W_e), decoder (W_d), offset (b_d), index (kept flat entries).
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .atomic import recover_folder
from .config import CONFIG_NAME, GradiendConfig, base_name
from .objective import CAUSAL_LM, MASKED_LM, resolve_objective

WEIGHTS_NAME = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."
KINDS = ("encoder", "decoder", "offset", "index")


def adapter_key(parameter_name: str, kind: str) -> str:
    module, _, local = parameter_name.rpartition(".")
    path = f"{module}." if module else ""
    return f"{KEY_PREFIX}{path}gradiend_{kind}.{local}"


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: Optional[dict[str, str]] = None) -> None:
    save_file(
        {k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path), metadata=metadata or {"format": "pt"}
    )


def damaged(path: str | os.PathLike, error: Exception) -> ValueError:
    return ValueError(f"Cannot read {path}: {error}. The adapter weights are damaged or incomplete; save them again.")


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as error:  # safetensors raises its own error types for truncated/corrupt files
        raise damaged(path, error) from None


def tensor_reader(path: str | os.PathLike) -> tuple[list[str], Callable[[str], torch.Tensor]]:
    """(keys, read one tensor by key) of a safetensors file, through its memory map: what is read is what is asked
    for. The header (and that the file covers it) is checked here."""
    try:
        handle = safe_open(str(path), framework="pt")
        keys = list(handle.keys())
    except Exception as error:
        raise damaged(path, error) from None

    def read(key: str) -> torch.Tensor:
        try:
            return handle.get_tensor(key)
        except Exception as error:
            raise damaged(path, error) from None

    return keys, read


def resolve_adapter_files(
    path_or_repo_id: str | os.PathLike, revision: Optional[str] = None, **hub_kwargs
) -> tuple[Path, Path]:
    """Paths of adapter_config.json and adapter_model.safetensors: from a local folder or through the Hub cache."""
    local = Path(path_or_repo_id)
    recover_folder(local)  # a save killed mid-swap is put back (or finished) before anything is read
    if local.is_dir():
        files = (local / CONFIG_NAME, local / WEIGHTS_NAME)
        for file in files:
            if not file.is_file():
                raise FileNotFoundError(
                    f"{file.name} is missing from {local}; a GRADIEND adapter folder holds {CONFIG_NAME} and "
                    f"{WEIGHTS_NAME} (written by GradiendModel.save_pretrained)."
                )
        return files
    from huggingface_hub import hf_hub_download

    config = hf_hub_download(str(path_or_repo_id), CONFIG_NAME, revision=revision, **hub_kwargs)
    weights = hf_hub_download(str(path_or_repo_id), WEIGHTS_NAME, revision=revision, **hub_kwargs)
    return Path(config), Path(weights)


# --- reading: the one parser of adapter tensors, for every load path ------------------------------------------------
def adapter_key_groups(keys: Iterable[str]) -> dict[str, dict[str, str]]:
    """Base parameter name -> {kind: key} from adapter tensor keys.

    Accepts the file's keys (`base_model.model.<module>.gradiend_<kind>.<param>`), the same without the prefix (as
    transformers hands them over) and keys carrying an adapter name (`...gradiend_<kind>.<adapter>.<param>`). Keys
    that are not GRADIEND tensors are an error: a file mixing adapters is not a GRADIEND adapter."""
    grouped: dict[str, dict[str, str]] = defaultdict(dict)
    for key in keys:
        body = key[len(KEY_PREFIX):] if key.startswith(KEY_PREFIX) else key
        head, marker, tail = body.rpartition(".gradiend_")
        if not marker and body.startswith("gradiend_"):  # a parameter of the root module
            head, marker, tail = "", "gradiend_", body[len("gradiend_"):]
        kind, _, rest = tail.partition(".")
        if not marker or kind not in KINDS or not rest:
            raise ValueError(f"Adapter tensor {key!r} is not one of the GRADIEND kinds {list(KINDS)}; this is not a "
                             "GRADIEND adapter file.")
        local = rest.rpartition(".")[2]
        grouped[f"{head}.{local}" if head else local][kind] = key
    return dict(grouped)


def group_adapter_tensors(state_dict: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Base parameter name -> {kind: tensor} (keys as adapter_key_groups reads them)."""
    return {name: {kind: state_dict[key] for kind, key in kinds.items()}
            for name, kinds in adapter_key_groups(state_dict).items()}


class FileTensors(Mapping[str, torch.Tensor]):
    """One base parameter's adapter tensors by kind, read from the file when asked for (and not kept): loading an
    adapter holds at most one parameter's tensors besides the bottleneck, and each process of a sharded bottleneck
    copies its slice of one parameter at a time. Loading reads each tensor twice from the memory map (check_fits checks
    the whole file before anything is copied, then the copy), the price of never holding the file."""

    def __init__(self, read: Callable[[str], torch.Tensor], keys: Mapping[str, str]):
        self.read, self.keys_by_kind = read, dict(keys)

    def __getitem__(self, kind: str) -> torch.Tensor:
        return self.read(self.keys_by_kind[kind])

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys_by_kind)

    def __len__(self) -> int:
        return len(self.keys_by_kind)


def read_adapter(path_or_repo_id: str | os.PathLike, revision: Optional[str] = None, **hub_kwargs: Any):
    """(config, tensors grouped by base parameter name and kind) of a saved adapter, local or on the Hub. The tensors
    are FileTensors: each is read from the file when it is used."""
    config_file, weights_file = resolve_adapter_files(path_or_repo_id, revision=revision, **hub_kwargs)
    keys, read = tensor_reader(weights_file)
    grouped = {name: FileTensors(read, kinds) for name, kinds in adapter_key_groups(keys).items()}
    return GradiendConfig.from_file(config_file), grouped


# --- validation: the one check that tensors fit a base model --------------------------------------------------------
def needed_kinds(decoder_bias: bool) -> list[str]:
    return ["encoder", "decoder"] + (["offset"] if decoder_bias else [])


def entry_problems(
    name: str, parameter: torch.Tensor, tensors: Mapping[str, torch.Tensor], latent_dim: int, decoder_bias: bool
) -> list[str]:
    """What is wrong with one base parameter's adapter tensors (empty when they fit): a missing or unexpected kind,
    a non-floating weight or non-int64 index, NaN/inf values, pruning indices outside the parameter, or a shape other
    than (latent_dim, *entries) for W_e/W_d and entries for b_d/index (no broadcasting: shapes must be exact)."""
    lacking = [k for k in needed_kinds(decoder_bias) if k not in tensors]
    if lacking:
        return [f"the {lacking} tensor(s) of {name} are missing; the file is incomplete, save it again"]
    if not decoder_bias and "offset" in tensors:
        return [f"the file holds a decoder bias for {name} but the config says decoder_bias: false; the config and "
                "the weights belong to different adapters"]
    problems = []
    for kind, tensor in tensors.items():
        if kind == "index" and tensor.dtype != torch.int64:
            problems.append(f"the pruning indices of {name} are {tensor.dtype}, not torch.int64")
        elif kind != "index" and not tensor.dtype.is_floating_point:
            problems.append(f"the {kind} tensor of {name} is {tensor.dtype}, not a floating-point tensor")
        elif kind != "index" and not bool(torch.isfinite(tensor).all()):
            problems.append(f"the {kind} tensor of {name} holds NaN or infinite values")
    if problems:
        return problems
    entries = tuple(parameter.shape)
    if "index" in tensors:
        index = tensors["index"]
        if index.dim() != 1 or (index.numel() and (int(index.min()) < 0 or int(index.max()) >= parameter.numel())):
            return [f"the pruning indices of {name} do not fit its {parameter.numel()} entries"]
        entries = (index.numel(),)
    weights = (latent_dim, *entries)
    expected = {"encoder": weights, "decoder": weights, "offset": entries, "index": entries}
    return [
        f"the {kind} tensor of {name} has shape {tuple(t.shape)}, but this base model needs {expected[kind]}"
        for kind, t in tensors.items()
        if tuple(t.shape) != expected[kind]
    ]


def check_objective(base_model: nn.Module, config: GradiendConfig) -> None:
    """A masked-LM adapter on a causal LM (or the reverse) would read and write gradients of another objective."""
    if config.objective not in (MASKED_LM, CAUSAL_LM):
        return
    try:
        actual = resolve_objective(base_model)
    except ValueError:  # an unknown model class: the config's explicit objective is all there is to go by
        return
    if actual != config.objective:
        raise ValueError(
            f"This adapter was trained with objective={config.objective!r}, but {type(base_model).__name__} is a "
            f"{actual.replace('_', ' ')} model. Load it onto the kind of model it was made for."
        )


def check_complete(config: GradiendConfig, grouped: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
    """The weights file covers exactly the parameters its config lists (`parameters`), pruned to the sizes it lists
    (`kept_entries`); both are written on save."""
    kept = {n: int(kinds["index"].numel()) for n, kinds in grouped.items() if "index" in kinds}
    if config.kept_entries is not None and kept != config.kept_entries:
        wrong = sorted(set(kept.items()) ^ set(config.kept_entries.items()))
        raise ValueError(
            f"The adapter's weights file does not match its config: the pruned sizes differ ({wrong[:3]}"
            f"{' ...' if len(wrong) > 3 else ''} as (parameter, kept entries), file vs `kept_entries`). The folder "
            "mixes two adapters or was damaged; save it again."
        )
    if config.parameters is None:  # written before `parameters` existed: the per-tensor checks still apply
        return
    names = list(grouped)
    absent = [n for n in config.parameters if n not in set(names)]
    extra = [n for n in names if n not in set(config.parameters)]
    if absent or extra:
        raise ValueError(
            f"The adapter's weights file does not match its config: the tensors of {absent[:3]}"
            f"{' ...' if len(absent) > 3 else ''} are missing and {extra[:3]}{' ...' if len(extra) > 3 else ''} are "
            "not listed in its `parameters`. The folder mixes two adapters or was damaged; save it again."
        )


def check_fits(
    base_model: nn.Module, config: GradiendConfig, grouped: Mapping[str, Mapping[str, torch.Tensor]]
) -> None:
    """Clear errors when an adapter does not belong to this base model, or its file lacks tensors (before any
    tensor is copied anywhere)."""
    made_for = config.base_model_name_or_path or "an unnamed base model"
    given = base_name(base_model) or type(base_model).__name__
    if not grouped:
        raise ValueError("The adapter file holds no GRADIEND tensors; it is empty or not a GRADIEND adapter.")
    check_complete(config, grouped)
    if isinstance(base_model, nn.Module):  # (PEFT passes a view of the unwrapped model and checks it itself)
        check_objective(base_model, config)
    params = dict(base_model.named_parameters())
    missing = [n for n in grouped if n not in params]
    if missing:
        raise ValueError(
            f"This adapter was made for {made_for}, but the base model ({given}, {type(base_model).__name__}) has no "
            f"parameter(s) {missing[:3]}{' ...' if len(missing) > 3 else ''}. "
            "Load it onto the base model it was made for."
        )
    problems = [
        p for n, t in grouped.items() for p in entry_problems(n, params[n], t, config.latent_dim, config.decoder_bias)
    ]
    if problems:
        raise ValueError(
            f"This adapter was made for {made_for} and does not fit this base model ({given}): "
            + "; ".join(problems[:3]) + (" ..." if len(problems) > 3 else "")
            + ". Load it onto a base model of the same size (the one it was made for)."
        )
