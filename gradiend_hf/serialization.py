"""On-disk adapter format (PEFT's layout) and resolving a local folder or Hub repo (atomic saves: atomic.py).

adapter_model.safetensors keys: `base_model.model.<module path>.gradiend_<kind>.<parameter's own name>`, e.g.
`base_model.model.model.layers.0.mlp.up_proj.gradiend_decoder.weight` for the decoder tensor of base parameter
`model.layers.0.mlp.up_proj.weight`. Kinds: encoder (W_e), decoder (W_d), offset (b_d), index (kept flat entries).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

from .config import CONFIG_NAME

WEIGHTS_NAME = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."
KINDS = ("encoder", "decoder", "offset", "index")


def adapter_key(parameter_name: str, kind: str) -> str:
    module, _, local = parameter_name.rpartition(".")
    path = f"{module}." if module else ""
    return f"{KEY_PREFIX}{path}gradiend_{kind}.{local}"


def parse_adapter_key(key: str) -> tuple[str, str]:
    """(base parameter name, kind) of an adapter tensor key."""
    if not key.startswith(KEY_PREFIX):
        raise ValueError(f"Adapter tensor {key!r} does not start with {KEY_PREFIX!r}; this is not a GRADIEND adapter file.")
    body = key[len(KEY_PREFIX):]
    head, _, local = body.rpartition(".")
    module, _, marker = head.rpartition(".")
    if not marker.startswith("gradiend_") or marker[len("gradiend_"):] not in KINDS:
        raise ValueError(f"Adapter tensor {key!r} is not one of the GRADIEND kinds {list(KINDS)}.")
    name = f"{module}.{local}" if module else local
    return name, marker[len("gradiend_"):]


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: Optional[dict[str, str]] = None) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path), metadata=metadata or {"format": "pt"})


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as error:  # safetensors raises its own error types for truncated/corrupt files
        raise ValueError(f"Cannot read {path}: {error}. The adapter weights are damaged or incomplete; save them again.") from None


def resolve_adapter_files(path_or_repo_id: str | os.PathLike, revision: Optional[str] = None, **hub_kwargs) -> tuple[Path, Path]:
    """Paths of adapter_config.json and adapter_model.safetensors: from a local folder or through the Hub cache."""
    local = Path(path_or_repo_id)
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
