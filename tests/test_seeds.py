"""train_seeds under faults: a diverged seed is a failed seed (the search goes on), every seed diverging is an error,
and resume=True continues each seed from its last complete checkpoint instead of starting over."""

import pytest
from test_trainer import CLASSES, CONTEXTS, args, feature_rows
from tiny import tiny_model, tokenizer_for

from gradiend_hf import GradiendConfig
from gradiend_hf.seeds import train_seeds
from gradiend_hf.trainer import GradiendTrainer


def common():
    return dict(train_dataset=feature_rows(CONTEXTS[:5]), eval_dataset=feature_rows(CONTEXTS[5:], seed=1),
                processing_class=tokenizer_for("bert"), config=GradiendConfig(feature_classes=CLASSES))


def spy_train(monkeypatch, diverging_seeds=(), calls=None):
    """GradiendTrainer.train, recording its resume argument and raising the divergence error for some seeds."""
    original = GradiendTrainer.train

    def train(self, resume_from_checkpoint=None, **kwargs):
        if calls is not None:
            calls.append((self.args.seed, resume_from_checkpoint))
        if self.args.seed in diverging_seeds:
            raise FloatingPointError("GRADIEND training stopped at step 1: the loss is NaN")
        return original(self, resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    monkeypatch.setattr(GradiendTrainer, "train", train)


def test_a_diverged_seed_is_recorded_as_failed_and_the_next_seed_is_trained(tmp_path, monkeypatch):
    spy_train(monkeypatch, diverging_seeds=(0,))
    search = train_seeds(tiny_model("bert"), args=args(tmp_path, learning_rate=1e-2, max_steps=100, eval_steps=25,
                                                       save_steps=25, per_device_train_batch_size=2),
                         seeds=(0, 1), **common())
    first, second = search.report["seeds"]
    assert not first["converged"] and "diverged" in first["reasons"][0] and first["output_dir"] is None
    assert search.seed == 1 and second["converged"] and search.report["seeds_tried"] == 2


def test_every_seed_diverging_is_an_error_naming_the_last_divergence(tmp_path, monkeypatch):
    spy_train(monkeypatch, diverging_seeds=(0, 1))
    with pytest.raises(FloatingPointError, match="Every seed diverged .*step 1"):
        train_seeds(tiny_model("bert"), args=args(tmp_path, max_steps=2), seeds=(0, 1), **common())


def test_resume_continues_a_seed_from_its_last_complete_checkpoint(tmp_path, monkeypatch):
    calls = []
    spy_train(monkeypatch, calls=calls)
    quick = dict(learning_rate=1e-12, eval_steps=2, save_steps=2, per_device_train_batch_size=2)
    train_seeds(tiny_model("bert"), args=args(tmp_path, max_steps=2, **quick), seeds=(0,), resume=True, **common())
    train_seeds(tiny_model("bert"), args=args(tmp_path, max_steps=4, **quick), seeds=(0,), resume=True, **common())
    assert calls == [(0, None), (0, True)]  # nothing to resume the first time; checkpoint-2 the second
    state = (tmp_path / "run" / "seed-0" / "trainer_state.json").read_text()
    assert '"global_step": 4' in state
