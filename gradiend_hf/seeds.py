"""Training several seeds and keeping the best convergent one (GRADIEND runs can fail to converge)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Sequence

from torch import nn

from .atomic import write_text_atomically
from .checkpointing import last_complete_checkpoint
from .comparison import seed_stability
from .config import GradiendConfig
from .model import GradiendModel
from .trainer import GradiendTrainer, GradiendTrainingArguments

logger = logging.getLogger("gradiend_hf")
SEED_REPORT = "seed_report.json"


@dataclass(frozen=True)
class SeedSearch:
    """The chosen adapter, its seed, and the report of every seed tried (also written as seed_report.json)."""

    model: GradiendModel
    seed: int
    report: dict[str, Any]


def score(entry: dict[str, Any]) -> tuple:
    """Convergent runs first, then higher |correlation| at their best evaluation."""
    return (bool(entry["converged"]), abs(entry["correlation"] or 0.0))


def train_seeds(
    base_model: nn.Module,
    config: GradiendConfig,
    args: GradiendTrainingArguments,
    train_dataset: Any,
    eval_dataset: Any,
    processing_class: Any,
    seeds: Sequence[int] = (0, 1, 2),
    enough: int = 1,
    resume: bool = False,
    **trainer_kwargs: Any,
) -> SeedSearch:
    """Train one adapter per seed (init and data order) until `enough` converged; keep the best.

    Each seed writes its run into `<output_dir>/seed-<seed>` (with the seed's best adapter at its top level); the best
    adapter is saved to `<output_dir>/best`. The report's "stability" entry (see `comparison.seed_stability`) holds the
    pairwise top-1% overlap and decoder cosine among the trained seeds.

    resume: continue each seed from the last complete checkpoint in its folder, if there is one (an interrupted
    search picks up where it stopped). A seed whose training diverges (FloatingPointError: NaN/inf) counts as not
    converged and the next seed is tried; if every seed diverges, the last error is raised.
    """
    if enough < 1 or not seeds:
        raise ValueError("train_seeds needs at least one seed and enough >= 1.")
    entries, best, best_entry, diverged = [], None, None, None
    for seed in seeds:
        run_args = dataclasses.replace(args, output_dir=os.path.join(args.output_dir, f"seed-{seed}"), seed=seed)
        model = GradiendModel(base_model, config.with_updates(init_seed=seed))
        trainer = GradiendTrainer(model=model, args=run_args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                                  processing_class=processing_class, **trainer_kwargs)
        checkpoint = last_complete_checkpoint(run_args.output_dir)[0] if resume else None
        try:
            trainer.train(resume_from_checkpoint=True if checkpoint else None)
        except FloatingPointError as error:
            logger.warning("seed %s diverged: %s", seed, error)
            entries.append({"seed": seed, "converged": False, "correlation": None, "best_step": None,
                            "class_means": {}, "reasons": [f"diverged: {error}"], "output_dir": None})
            diverged = error
            continue
        # the seed's best adapter, for the stability summary and later comparisons (every process: a sharded model
        # is saved by all of them together)
        trainer.gradiend_model.save_pretrained(run_args.output_dir, is_main_process=run_args.should_save)
        verdict = trainer.verdict
        entry = {
            "seed": seed,
            "converged": verdict["converged"],
            "correlation": verdict["best"].get("correlation"),
            "best_step": verdict["best"].get("step"),
            "class_means": {c: verdict["best"].get(f"mean_h_{c}") for c in config.feature_classes},
            "reasons": verdict["reasons"],
            "output_dir": run_args.output_dir,
        }
        entries.append(entry)
        logger.info("seed %s: converged=%s correlation=%s", seed, entry["converged"], entry["correlation"])
        if best_entry is None or score(entry) > score(best_entry):
            best, best_entry = trainer.gradiend_model, entry
        if sum(e["converged"] for e in entries) >= enough:
            break
    if best_entry is None:
        raise FloatingPointError(f"Every seed diverged ({len(entries)} tried); the last: {diverged}") from diverged
    if not best_entry["converged"]:
        logger.warning(
            "No seed converged; keeping seed %s with |correlation| %.3f.",
            best_entry["seed"],
            abs(best_entry["correlation"] or 0),
        )
    report = {
        "chosen_seed": best_entry["seed"],
        "chosen_converged": best_entry["converged"],
        "seeds_tried": len(entries),
        "seeds_converged": sum(e["converged"] for e in entries),
        "seeds": entries,
        # pairwise top-k overlap and decoder cosine among the trained seeds (read back from their run dirs)
        "stability": (
            seed_stability({e["seed"]: e["output_dir"] for e in entries if e["output_dir"]},
                           converged={e["seed"]: e["converged"] for e in entries if e["output_dir"]})
            if args.should_save
            else None
        ),
    }
    best.save_pretrained(os.path.join(args.output_dir, "best"), is_main_process=args.should_save)
    if args.should_save:
        write_text_atomically(os.path.join(args.output_dir, SEED_REPORT), json.dumps(report, indent=2))
    return SeedSearch(model=best, seed=best_entry["seed"], report=report)
