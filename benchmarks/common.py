"""Shared pieces of the performance benchmarks: the two models, the 32 benchmark rows, timing, memory, tables, JSON.

Models: (a) `bert-base`: a BERT-base-shaped masked LM (12 layers, hidden 768, 12 heads, vocab 30,522, random init,
built here) with a WordPiece tokenizer trained once on the offline Wikipedia text; (b) `smollm2`: the real
SmolLM2-135M (offline.load_smollm2).
"""

from __future__ import annotations

import functools
import json
import os
import platform
import re
import time
from pathlib import Path
from typing import Callable

import torch

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = ("bert-base", "smollm2")
FEMALE = ["Mary", "Patricia", "Jennifer", "Linda", "Elizabeth", "Barbara", "Susan", "Jessica"]
MALE = ["James", "John", "Robert", "Michael", "William", "David", "Richard", "Joseph"]
TEMPLATES = [
    "{name} said that [MASK] would be late for the meeting today.",
    "When {name} arrived at the station, [MASK] was very tired.",
    "{name} told the nurse that [MASK] had finished the report.",
    "I asked {name} whether [MASK] wanted another cup of coffee.",
]


def benchmark_rows(n: int = 32, transition: str = "female->male") -> list[dict]:
    """n rows of one transition (a training batch holds one): female names with she -> he by default."""
    factual_class, alternative_class = transition.split("->")
    names = FEMALE if factual_class == "female" else MALE
    word = {"female": "she", "male": "he"}
    rows = [dict(masked=t.format(name=name), factual=word[factual_class], alternative=word[alternative_class],
                 factual_class=factual_class, alternative_class=alternative_class) for name in names for t in TEMPLATES]
    return [rows[i % len(rows)] for i in range(n)]


def mixed_rows(n: int = 32) -> list[dict]:
    """n rows of both classes (per-row encodings are taken of mixed evaluation rows)."""
    half = benchmark_rows(n // 2, "female->male")
    return [r for pair in zip(half, benchmark_rows(n - n // 2, "male->female")) for r in pair]


@functools.lru_cache(maxsize=None)
def bert_tokenizer():
    """A 30,522-piece WordPiece tokenizer trained on the offline Wikipedia text (cached; built in ~20 s once)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from gradiend_hf.offline import cache_root, cached_folder

    def build(tmp: Path) -> dict:
        from gradiend_hf.creation.sources import wikipedia_texts

        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        tok.train_from_iterator(wikipedia_texts(), trainers.WordPieceTrainer(vocab_size=30522, special_tokens=specials))
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))])
        tok.decoder = decoders.WordPiece()
        PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                sep_token="[SEP]", mask_token="[MASK]").save_pretrained(str(tmp))
        return {"vocab_size": tok.get_vocab_size()}

    folder = cached_folder(cache_root(), "benchmark-bert-base-tokenizer", build, ("tokenizer.json",))
    return PreTrainedTokenizerFast.from_pretrained(str(folder))


def load_model(name: str, seed: int = 0):
    """(model, tokenizer) of a benchmark model, in eval mode, weights paged in (so memory baselines are settled)."""
    if name == "bert-base":
        from transformers import BertConfig, BertForMaskedLM

        torch.manual_seed(seed)
        model = BertForMaskedLM(BertConfig(vocab_size=30522)).eval()
        tokenizer = bert_tokenizer()
    elif name == "smollm2":
        from gradiend_hf.offline import load_smollm2

        model, tokenizer = load_smollm2()
    else:
        raise ValueError(f"Unknown benchmark model {name!r}; choose one of {MODELS}.")
    with torch.no_grad():
        for p in model.parameters():
            p.sum()
    return model, tokenizer


def best_of(fn: Callable[[], object], repeats: int) -> float:
    """Fastest of `repeats` timed calls after one warm-up (the minimum is the least disturbed by other processes)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def alternating(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Best time of each function, timed in alternation so that a busy spell of the machine hits all of them."""
    for fn in fns.values():
        fn()
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def memory() -> dict[str, int]:
    """Current (VmRSS) and peak (VmHWM) resident memory of this process, bytes."""
    text = Path("/proc/self/status").read_text()
    return {key: 1024 * int(re.search(rf"{key}:\s+(\d+)", text).group(1)) for key in ("VmRSS", "VmHWM")}


def reset_peak() -> None:
    """Start a new VmHWM high-water mark (Linux /proc/self/clear_refs)."""
    Path("/proc/self/clear_refs").write_text("5")


def machine() -> dict:
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), "?")
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version()}


def markdown(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_results(name: str, payload: dict, table: str) -> None:
    """benchmarks/results/<name>.json (numbers + machine) and <name>.md (the table), and print the table."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"machine": machine(), **payload}
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(table + "\n")
    print(table)
