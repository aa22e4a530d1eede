"""Core costs on the real SmolLM2-135M (2-core CPU): a gradient step vs a plain forward+backward, and per-row
encodings by forward-mode AD vs one backward pass per row. Prints a markdown ratio table; checks equal results.

Run: .venv/bin/python benchmarks/core_smollm2.py [--rows 8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import torch

from gradiend_hf import GradiendConfig, GradiendDataCollator, get_gradiend_model
from gradiend_hf.gradients import side_inputs
from gradiend_hf.objective import row_losses
from gradiend_hf.offline import load_smollm2

NAMES = ["Mary", "John", "Linda", "James", "Susan", "Robert", "Karen", "David"]


def rows(n: int) -> list[dict]:
    return [dict(masked=f"{NAMES[i % len(NAMES)]} told the nurse that [MASK] would be late today.", factual="she",
                 alternative="he", factual_class="female", alternative_class="male") for i in range(n)]


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    base, tokenizer = load_smollm2()
    model = get_gradiend_model(base, GradiendConfig(feature_classes=["female", "male"],
                                                    target_parameters=[r"model\.layers\.1[2-5]\.(self_attn|mlp)\."]))
    collate = GradiendDataCollator(tokenizer, model.objective, ["female", "male"])
    batch = collate(rows(args.rows))

    def plain_step():
        for p in model.selected_parameters().values():
            p.requires_grad_(True)
        loss = row_losses(base(**side_inputs(batch, "alternative")).logits, batch["alternative_labels"]).mean()
        loss.backward()
        for p in model.selected_parameters().values():
            p.grad = None
            p.requires_grad_(False)

    def gradiend_step():
        model(**batch).loss.backward()

    per_row = lambda: model.encode_rows(batch)
    backward_per_row = lambda: torch.stack([model.encode(collate([r])) for r in rows(args.rows)])
    torch.testing.assert_close(per_row(), backward_per_row(), rtol=1e-3, atol=1e-6)
    results = [
        ("training step (source+target gradients, MSE, backward)", timed(gradiend_step, args.repeats), "plain fwd+bwd", timed(plain_step, args.repeats)),
        (f"per-row encodings of {args.rows} rows (jvp)", timed(per_row, args.repeats), f"{args.rows} backward passes", timed(backward_per_row, args.repeats)),
    ]
    print(f"SmolLM2-135M, {model.num_entries:,} selected weights (layers 12-15 attn+MLP), {args.rows} rows, "
          f"{torch.get_num_threads()} threads\n")
    print("| measured | seconds | baseline | seconds | ratio |\n|---|---|---|---|---|")
    for name, t, baseline, tb in results:
        print(f"| {name} | {t:.3f} | {baseline} | {tb:.3f} | {t / tb:.2f}x |")


if __name__ == "__main__":
    main()
