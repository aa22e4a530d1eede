"""Training stops once the encoder has converged and stopped improving (GradiendTrainingArguments.early_stopping_*)."""

from __future__ import annotations

import pytest
from transformers import TrainerControl, TrainerState

from gradiend_hf.trainer import ConvergenceCallback, GradiendTrainingArguments


def run(correlations, tmp_path, **kwargs):
    """Feed evaluations to the callback; the step at which it stops training (None: it never does)."""
    args = GradiendTrainingArguments(output_dir=str(tmp_path), **kwargs)
    callback = ConvergenceCallback(["female", "male"])
    state, control = TrainerState(), TrainerControl()
    for i, corr in enumerate(correlations, start=1):
        state.global_step = 50 * i
        metrics = {"eval_correlation": corr, "eval_mean_h_female": 0.9 * (1 if corr > 0.5 else 0.1),
                   "eval_mean_h_male": -0.9}
        callback.on_evaluate(args, state, control, metrics=metrics)
        if control.should_training_stop:
            return state.global_step
    return None


@pytest.mark.parametrize("correlations, patience, stop", [
    ([0.9986, 0.99995, 0.99998, 0.99999], 1, 150),   # the main job's seed 0: +0.0014, then +0.00002
    ([0.9986, 0.99995, 0.99998, 0.99999], 2, 200),
    ([0.9986, 0.99995, 0.99998, 0.99999], None, None),  # off: every step runs
    ([0.2, 0.2, 0.2, 0.2], 1, None),                    # not converged: never stopped for stalling
    ([0.2, 0.9, 0.9, 0.95], 1, 150),                    # stalls only after converging
    ([0.9, float("nan"), 0.95, 0.9505], 1, 100),        # a NaN evaluation is no improvement
])
def test_training_stops_after_patience_evaluations_without_improvement_once_converged(
        correlations, patience, stop, tmp_path):
    assert run(correlations, tmp_path, early_stopping_patience=patience) == stop


def test_the_threshold_decides_what_counts_as_improvement(tmp_path):
    series = [0.95, 0.96, 0.97, 0.98]
    assert run(series, tmp_path, early_stopping_patience=1, early_stopping_threshold=0.001) is None
    assert run(series, tmp_path, early_stopping_patience=1, early_stopping_threshold=0.02) == 100


def test_a_patience_below_one_is_refused(tmp_path):
    with pytest.raises(ValueError, match="early_stopping_patience must be at least 1"):
        GradiendTrainingArguments(output_dir=str(tmp_path), early_stopping_patience=0)
