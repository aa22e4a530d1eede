"""Auxiliary masked head vs plain next-token gradients on SmolLM2-135M, for a feature decided AFTER the mask.

Rows: "[MASK] hurt herself while running." / "[MASK] became a grandfather last year." ... The masked pronoun
(She/He) is decided only by a later word (reflexive pronoun, gendered role noun). A causal LM predicting the pronoun
sees only the left context, so its gradient cannot depend on the deciding word; the auxiliary head reads both sides.
Each context also gives an identity row (factual == alternative == the right pronoun, label 0, target gradient 0):
a context-aware encoder reads ~0 there and +-1 on the contradicted rows.

Split: role words AND frames are held out for the test (test rows share neither with training).
Same selected weights (layers 12-15 attention + MLP), same steps, lr, seed and rows for both objectives.
Metrics on the held-out test (gradiend_hf.evaluate_encoder, no extra neutral rows):
  corr +-1     Pearson(h, label) over the feature rows (label = alternative's class: +1 female, -1 male);
  corr +-1/0   the same with the identity rows (label 0) included: does h depend on the context?
  |h| ident.   mean |h| over identity rows (should be ~0).
Also the head's held-out accuracy at predicting the pronoun's class from the whole sentence.

Run: nice -n 10 .venv/bin/python benchmarks/aux_head.py [--steps 80] [--seed 0]
Writes benchmarks/results/aux_head.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results" / "aux_head.json"
CLASSES = ["female", "male"]
# (female, male) role words; the first TEST_ROLES pairs of each group are held out
KIN = [("mother", "father"), ("grandmother", "grandfather"), ("aunt", "uncle"), ("sister", "brother"),
       ("daughter", "son"), ("wife", "husband"), ("niece", "nephew"), ("stepmother", "stepfather"),
       ("godmother", "godfather"), ("granddaughter", "grandson")]
JOBS = [("actress", "actor"), ("waitress", "waiter"), ("queen", "king"), ("princess", "prince"),
        ("duchess", "duke"), ("hostess", "host"), ("businesswoman", "businessman"), ("policewoman", "policeman"),
        ("chairwoman", "chairman"), ("heroine", "hero"), ("nun", "monk"), ("empress", "emperor")]
REFLEXIVE = [("herself", "himself")]
KIN_FRAMES = ["[MASK] became a {role} last year.", "[MASK] is the proudest {role} I know.",
              "Everyone agrees that [MASK] is a loving {role}.", "[MASK] has always been a caring {role}.",
              "In the photo [MASK] is the {role} on the left.",
              "[MASK] was the only {role} at the party."]
JOB_FRAMES = ["[MASK] worked as a {role} for many years.", "[MASK] was a famous {role} in the old days.",
              "I think [MASK] will be a great {role}.", "[MASK] became a {role} at a young age.",
              "Last week [MASK] started as the new {role} downtown.",
              "[MASK] is the best {role} in town."]
REFLEXIVE_FRAMES = ["[MASK] hurt {role} while running.", "[MASK] introduced {role} to the class.",
                    "After the game [MASK] blamed {role} for the loss.", "[MASK] taught {role} to play the piano.",
                    "[MASK] bought {role} a new bike.", "On Monday [MASK] reminded {role} to call home."]
TEST_FRAMES = 2  # the last frames of every group are held out
TEST_ROLES = 3   # the first role pairs of KIN and JOBS are held out (reflexives: only one pair, split by frame)


def pronoun(frame: str, female: bool) -> str:
    word = "she" if female else "he"
    return word.capitalize() if frame.startswith("[MASK]") else word


def rows_for(frames: list[str], pairs: list[tuple[str, str]]) -> list[dict]:
    out = []
    for frame in frames:
        for pair in pairs:
            for female in (True, False):
                masked = frame.format(role=pair[0] if female else pair[1])
                factual, alternative = pronoun(frame, female), pronoun(frame, not female)
                cls, other = ("female", "male") if female else ("male", "female")
                out.append(dict(masked=masked, factual=factual, alternative=alternative, factual_class=cls,
                                alternative_class=other))
                out.append(dict(masked=masked, factual=factual, alternative=factual, factual_class=cls,
                                alternative_class=cls))
    return out


def split() -> dict[str, list[dict]]:
    groups = [(KIN_FRAMES, KIN, TEST_ROLES), (JOB_FRAMES, JOBS, TEST_ROLES), (REFLEXIVE_FRAMES, REFLEXIVE, 0)]
    data = {"train": [], "test": []}
    for frames, pairs, held in groups:
        train_pairs, test_pairs = (pairs[held:], pairs[:held]) if held else (pairs, pairs)
        data["train"] += rows_for(frames[:-TEST_FRAMES], train_pairs)
        data["test"] += rows_for(frames[-TEST_FRAMES:], test_pairs)
    rng = random.Random(0)
    rng.shuffle(data["train"])
    data["validation"], data["train"] = data["train"][:32], data["train"][32:]
    return data


def encoder_figures(model, test: list[dict], tokenizer) -> dict:
    import numpy as np

    from gradiend_hf import evaluate_encoder

    result = evaluate_encoder(model, test, tokenizer, neutral=0, progress=False)
    frame = result.frame
    identity = (frame["factual"] == frame["alternative"]).to_numpy()
    return {"corr_feature": result.correlation, "corr_with_identity": result.correlation_with_neutral,
            "mean_abs_h_identity": float(np.abs(frame["h"].to_numpy()[identity]).mean()),
            "binary_accuracy": result.binary_accuracy, "ternary_accuracy": result.ternary_accuracy,
            **{k: v for k, v in result.summary().items() if k.startswith("mean_h_")}}


def run(objective: str, data: dict, args, head=None) -> dict:
    from gradiend_hf import GradiendConfig, GradiendTrainer, GradiendTrainingArguments, get_gradiend_model
    from gradiend_hf.offline import load_smollm2

    base, tokenizer = load_smollm2()
    if head is not None:
        head.to(base.device)
    config = GradiendConfig(feature_classes=CLASSES, objective=objective, init_seed=args.seed,
                            target_parameters=[r"model\.layers\.1[2-5]\.(self_attn|mlp)\."])
    model = get_gradiend_model(base, config, auxiliary_head=head)
    out = Path(args.out) / objective
    trainer = GradiendTrainer(
        model=model,
        args=GradiendTrainingArguments(output_dir=str(out), learning_rate=args.learning_rate, max_steps=args.steps,
                                       eval_steps=args.eval_steps, save_steps=args.eval_steps, logging_steps=10,
                                       per_device_train_batch_size=args.batch_size, seed=args.seed, report_to=[],
                                       disable_tqdm=True),
        train_dataset=data["train"], eval_dataset=data["validation"], processing_class=tokenizer,
    )
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    figures = encoder_figures(model, data["test"], tokenizer)
    best = max((e for e in trainer.state.log_history if "eval_correlation" in e),
               key=lambda e: abs(e["eval_correlation"]), default={})
    return {"objective": objective, "train_seconds": seconds, "best_eval_correlation": best.get("eval_correlation"),
            **figures}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--eval-steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--head-steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="runs/aux_head_benchmark")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from gradiend_hf.aux_head import head_accuracy, train_auxiliary_head
    from gradiend_hf.offline import load_smollm2

    data = split()
    print({k: len(v) for k, v in data.items()})
    base, tokenizer = load_smollm2()
    start = time.perf_counter()
    head = train_auxiliary_head(base, tokenizer, data["train"], CLASSES, steps=args.head_steps, seed=args.seed)
    head_seconds = time.perf_counter() - start
    head_test = head_accuracy(base, tokenizer, head, data["test"])
    print(f"head: train accuracy {head.head_config.training['train_accuracy']:.3f}, "
          f"held-out {head_test:.3f}, {head_seconds:.1f}s")
    del base

    results = [run("causal_lm", data, args), run("auxiliary_mlm", data, args, head=head)]
    record = {"args": vars(args), "rows": {k: len(v) for k, v in data.items()},
              "head": {"train_accuracy": head.head_config.training["train_accuracy"], "test_accuracy": head_test,
                       "seconds": head_seconds}, "results": results}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(record, indent=2) + "\n")

    print(f"\nSmolLM2-135M, layers 12-15 attn+MLP, {args.steps} steps, lr {args.learning_rate}, seed {args.seed}; "
          f"held-out frames and role words ({len(data['test'])} test rows, half identity rows)\n")
    print("| objective | corr ±1 (feature rows) | corr ±1/0 (with identity rows) | mean |h| identity | "
          "mean h female / male | best val corr | train s |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['objective']} | {r['corr_feature']:.3f} | {r['corr_with_identity']:.3f} | "
              f"{r['mean_abs_h_identity']:.3f} | "
              f"{r.get('mean_h_female', float('nan')):+.3f} / {r.get('mean_h_male', float('nan')):+.3f} | "
              f"""{r['best_eval_correlation'] if r['best_eval_correlation'] is None
                   else round(r['best_eval_correlation'], 3)} | """
              f"{r['train_seconds']:.0f} |")
    print(f"\nauxiliary head: held-out class accuracy {head_test:.3f} "
          f"(train {head.head_config.training['train_accuracy']:.3f})")


if __name__ == "__main__":
    main()
