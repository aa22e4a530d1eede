"""One process of a sharded training run (torch.distributed.run --nproc_per_node N, gloo): the cases of
tests/test_sharded_training.py, each trained with sharded steps; rank 0 writes what the test compares with one process.

python -m torch.distributed.run --nproc_per_node 2 tests/sharded_worker.py --out DIR --tokenizers DIR
"""

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from transformers import PreTrainedTokenizerFast

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny import rows, tiny_model, tokenizer_for  # noqa: E402

from gradiend_hf import GradiendConfig, GradiendDataCollator, get_gradiend_model  # noqa: E402
from gradiend_hf.fused import AdamWSteps  # noqa: E402
from gradiend_hf.sharding import sharded_training_step  # noqa: E402

CLASSES = ["female", "male"]
LEARNING_RATE = 1e-2
CASES = {
    "gpt2-factual-alternative": dict(kind="gpt2", config={}),
    "llama-diff-tanh-decoder": dict(kind="llama", config={"source": "factual", "target": "diff",
                                                          "decoder_activation": "tanh"}),
    "bert-alternative-factual": dict(kind="bert", config={"source": "alternative", "target": "factual",
                                                          "encoder_activation": "sigmoid"}),
    "gpt2-pruned": dict(kind="gpt2", config={}, pruned=True),
    "llama-latent2-nobias": dict(kind="llama", config={"latent_dim": 2, "decoder_bias": False}),
}


def batches(collator):
    forward, backward = rows(), rows(factual_first=False)
    return [collator(forward), collator(backward[:3]), collator(forward[:1]), collator(backward[1:])]


def pruned_indices(model, seed: int = 3):
    """A fixed random subset of the entries of the first few selected weights (and none pruned of the rest)."""
    generator = torch.Generator().manual_seed(seed)
    chosen = {}
    for name, p in list(model.named_parameters())[:6]:
        if p.numel() > 8:
            chosen[name] = torch.randperm(p.numel(), generator=generator)[: p.numel() // 3].sort().values
    return chosen


def build(case: dict, tokenizers: Optional[Path] = None):
    """The case's GradiendModel and collator. The tiny tokenizers are trained when made, and the vocabulary order of a
    trained WordPiece depends on the process's hash seed: the processes load the test process's from `tokenizers`."""
    from gradiend_hf.model import GradiendModel

    model = tiny_model(case["kind"])
    config = GradiendConfig(feature_classes=CLASSES, **case["config"])
    if case.get("pruned"):
        gradiend = GradiendModel(model, config, indices=pruned_indices(model))
    else:
        gradiend = get_gradiend_model(model, config)
    kind = case["kind"]
    tokenizer = (tokenizer_for(kind) if tokenizers is None
                 else PreTrainedTokenizerFast.from_pretrained(str(tokenizers / kind)))
    return gradiend, GradiendDataCollator(tokenizer, gradiend.objective, CLASSES)


def train(gradiend, collator, step_function, flip_after: int = 2):
    """Four steps (a sign flip after the second), then every row's h; (losses, grad norms, h)."""
    parameters = list(gradiend.bottleneck.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=LEARNING_RATE, weight_decay=0.01, fused=True)
    steps = AdamWSteps(optimizer)
    losses, norms = [], []
    gradients = {}
    for i, batch in enumerate(batches(collator)):
        result = step_function(gradiend, batch, optimizer, steps)
        if i == 0:  # the first step's source gradient, whole
            b, source = gradiend.bottleneck, gradiend.engine.buffer("source")
            whole = b.assemble if gradiend.is_sharded else (lambda _, slice_: slice_.clone())
            gradients = {n: whole(n, source[n].reshape(-1)) for n in b.names}
        losses.append(float(result.loss))
        norms.append(result.grad_norm)
        if i + 1 == flip_after:
            from gradiend_hf.trainer import flip_sign

            flip_sign(gradiend, optimizer)
    h = gradiend.encode_rows(collator(rows() + rows(factual_first=False)[:2]))
    return losses, norms, h, gradients


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--tokenizers", required=True, help="a folder per model kind, saved by the test process")
    args = parser.parse_args()
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    out = Path(args.out)
    rank = dist.get_rank()
    for name, case in CASES.items():
        gradiend, collator = build(case, Path(args.tokenizers))
        assert gradiend.is_sharded, "a GradiendModel built under torch.distributed must be sharded"
        losses, norms, h, gradients = train(gradiend, collator, sharded_training_step)
        whole = gradiend.bottleneck.unsharded()
        if rank == 0:
            tensors = {**{k: v.detach() for k, v in whole.state_dict().items()},
                       **{f"gradient.{n}": g for n, g in gradients.items()}}
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / f"{name}.safetensors"))
            b = gradiend.bottleneck
            record = {"losses": losses, "norms": norms, "h": h.tolist(), "world_size": dist.get_world_size(),
                      "local_entries": b.local_entries, "num_entries": b.num_entries}
            (out / f"{name}.json").write_text(json.dumps(record))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
