"""`gradiend-hf` on tiny models: every subcommand, the run folder, the report, the saved model, and bad job files."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from test_trainer import CONTEXTS, feature_rows
from tiny import tiny_model, tokenizer_for
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

from gradiend_hf.cards import format_edit_value
from gradiend_hf import GradiendConfig, GradiendModel, get_gradiend_model
from gradiend_hf.app.cli import main
from gradiend_hf.app.job import EvaluationSpec, JobConfig, JobConfigError, demo_job
from gradiend_hf.app.report import number
from gradiend_hf.evaluation import crows_pairs

ROOT = Path(__file__).resolve().parents[1]
NEUTRAL = ["the results were good and they went home", "it was in the room", "the nurse and the doctor went home",
           "they said it was bad"]
PROBES = ["the doctor said that [MASK] went home", "[MASK] was in the room"]


def write_job(tmp_path: Path, kind: str = "bert", **changes) -> Path:
    """A tiny model folder, row files and a job file using them."""
    model_dir = tmp_path / "base"
    tiny_model(kind).save_pretrained(model_dir)
    tokenizer_for(kind).save_pretrained(model_dir)
    files = {}
    for split, rows in (("train", feature_rows(CONTEXTS[:5])), ("validation", feature_rows(CONTEXTS[5:], seed=1)),
                        ("test", feature_rows(CONTEXTS[5:], seed=2))):
        files[split] = tmp_path / f"{split}.jsonl"
        pd.DataFrame(rows).to_json(files[split], orient="records", lines=True)
    files["neutral"] = tmp_path / "neutral.txt"
    files["neutral"].write_text("\n".join(NEUTRAL) + "\n")
    job = {
        "model": str(model_dir),
        "output_dir": str(tmp_path / "run"),
        "data": {name: str(path) for name, path in files.items()},
        "seeds": [1],
        "gradiend": {"feature_classes": ["female", "male"]},
        "training": {"learning_rate": 1e-2, "max_steps": 100, "eval_steps": 25, "save_steps": 25, "logging_steps": 10,
                     "per_device_train_batch_size": 2, "disable_tqdm": True},
        "evaluation": {"decoder_rows": 8, "neutral_texts": 4, "learning_rates": [0.01, 0.1, 1.0],
                       "neutral_contexts": PROBES, "lms_ratio": 0.9},
    }
    for key, value in changes.items():
        job[key] = value
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def class_probability_by_hand(model, tokenizer, context: str, words: list[str]) -> float:
    """Oracle: softmax at the [MASK] of a masked LM, summed over one-token words."""
    ids = tokenizer(context.replace("[MASK]", tokenizer.mask_token), return_tensors="pt")
    position = (ids["input_ids"][0] == tokenizer.mask_token_id).nonzero().item()
    with torch.no_grad():
        probs = model(**ids).logits[0, position].softmax(-1)
    return sum(float(probs[tokenizer.convert_tokens_to_ids(w)]) for w in words)


def test_run_writes_the_whole_run_folder_and_the_saved_model_reproduces_the_report(tmp_path, capsys):
    job = write_job(tmp_path)
    assert main(["run", str(job)]) == 0
    run = tmp_path / "run"
    assert f"report: {run / 'report.md'}" in capsys.readouterr().out
    for name in ("run.json", "job.yaml", "adapter/adapter_config.json", "adapter/README.md", "plots/training.png",
                 "plots/encoder.png", "plots/decoder.png", "results/evaluation.json", "results/decoder_grid.csv",
                 "results/contexts.csv", "models/balance/config.json", "models/balance/README.md", "report.md"):
        assert (run / name).is_file(), name
    evaluation = json.loads((run / "results" / "evaluation.json").read_text())
    assert evaluation["encoder"]["correlation"] >= 0.9  # the learnable feature of the trainer tests
    assert set(evaluation["edits"]) == {"balance", "female", "male"}
    report = (run / "report.md").read_text()
    assert f"| {number(evaluation['encoder']['correlation'])} |" in report and "| holds |" in report

    # the adapter stores the balance edit (merge_and_unload() and PEFT apply it) and its card lists every chosen edit
    stored = json.loads((run / "adapter" / "adapter_config.json").read_text())
    balance = evaluation["edits"]["balance"]
    assert (stored["feature_factor"], stored["learning_rate"]) == (balance["feature_factor"], balance["learning_rate"])
    card = (run / "adapter" / "README.md").read_text()
    assert "No edit stored" not in card and "Edits chosen by the evaluation" in card
    for goal, edit in evaluation["edits"].items():
        assert f"| {format_edit_value(edit['learning_rate'])} |" in card, goal

    # the saved model is plain transformers and reproduces the neutral-context probabilities of its edit
    merged = AutoModelForMaskedLM.from_pretrained(run / "models" / "balance")
    tokenizer = AutoTokenizer.from_pretrained(run / "models" / "balance")
    contexts = pd.read_csv(run / "results" / "contexts.csv")
    words = {"female": ["she", "her"], "male": ["he", "his"]}
    for context in PROBES:
        row = contexts[(contexts["model"] == "balance") & (contexts["context"] == context)].iloc[0]
        for cls, ws in words.items():
            assert class_probability_by_hand(merged, tokenizer, context, ws) == pytest.approx(row[cls], rel=1e-4)
    reload = json.loads((run / "results" / "reload.json").read_text())
    assert reload["contexts"]["p_female"] == pytest.approx(evaluation["contexts"]["balance"]["p_female"], rel=1e-5)


def test_train_evaluate_rewrite_push_as_separate_steps_on_a_causal_lm(tmp_path, hub, capsys):
    evaluation = {"decoder_rows": 8, "neutral_texts": 4, "learning_rates": [0.01, 0.1, 1.0], "neutral_contexts": PROBES,
                  "lms_ratio": 0.9, "benchmarks": {"crows_pairs": "gender", "winogender": None}, "benchmark_limit": 6,
                  "benchmark_goals": ["male"]}
    job = write_job(tmp_path, kind="llama", evaluation=evaluation)
    run = tmp_path / "run"
    assert main(["train", str(job)]) == 0  # 100 steps: the encoder must converge, or nothing is saved
    assert (run / "adapter" / "adapter_config.json").is_file() and not (run / "results" / "evaluation.json").exists()
    assert json.loads((run / "results" / "training.json").read_text())["steps"] == 100
    assert main(["evaluate", str(run)]) == 0
    assert (run / "report.md").is_file()
    evaluation = json.loads((run / "results" / "evaluation.json").read_text())
    male = evaluation["edits"]["male"]
    assert main(["rewrite", str(run), "--goal", "male", "--output", str(tmp_path / "male")]) == 0
    # the rewritten model equals the adapter's edit applied by hand
    base = tiny_model("llama")
    adapter = GradiendModel.from_pretrained(base, run / "adapter")
    expected = adapter.merge_and_unload(feature_factor=male["feature_factor"], learning_rate=male["learning_rate"])
    rewritten = AutoModelForCausalLM.from_pretrained(tmp_path / "male")
    for (name, p), (_, q) in zip(expected.named_parameters(), rewritten.named_parameters()):
        assert torch.equal(p, q), name
    # bias benchmarks: the base and the edits of benchmark_goals; the 'male' rows are what the rewritten model scores
    scored = pd.read_csv(run / "results" / "benchmarks.csv")
    assert set(scored["model"]) == {"base", "male"}
    tokenizer = tokenizer_for("llama")
    for model_name, model in (("base", tiny_model("llama")), ("male", rewritten)):
        crows = crows_pairs(model, tokenizer, "gender", limit=6, progress=False)
        row = scored[(scored["model"] == model_name) & (scored["metric"] == "score")].iloc[0]
        assert (row["value"], row["n"], row["subset"]) == (pytest.approx(crows.score), 6, "gender")
    assert "## Bias benchmarks" in (run / "report.md").read_text()
    card = (tmp_path / "male" / "README.md").read_text()
    assert "## Public bias benchmarks: base vs. this model" in card and "| this model |" in card
    assert main(["push", str(run / "adapter"), "user/tiny-adapter"]) == 0
    assert main(["push", str(tmp_path / "male"), "user/tiny-male", "--revision", "v1"]) == 0
    adapter_upload, model_upload = hub.uploads
    assert set(adapter_upload["files"]) == {"adapter_config.json", "adapter_model.safetensors", "README.md"}
    assert {"config.json", "model.safetensors", "README.md", "tokenizer.json"} <= set(model_upload["files"])
    assert model_upload["revision"] == "v1"
    # the pushed adapter loads back through the Hub path to the same encoder
    loaded = GradiendModel.from_pretrained(tiny_model("llama"), "user/tiny-adapter")
    assert all(torch.equal(a, b) for a, b in zip(
        loaded.bottleneck.parameters(),
        GradiendModel.from_pretrained(tiny_model("llama"), run / "adapter").bottleneck.parameters()))
    assert "pushed" in capsys.readouterr().out


@pytest.mark.parametrize("change, message", [
    ({"trainer": {}}, "Unknown key 'trainer' in the job file. Did you mean 'training'?"),
    ({"training": {"learning_rat": 1e-3}}, "Unknown key 'learning_rat' in training. Did you mean 'learning_rate'?"),
    ({"gradiend": {"feature_classes": ["a", "b"], "source": "gradient"}}, "source"),
    ({"data": {"recipe": "english_genders"}}, "data.recipe is 'english_genders'; allowed values: english_gender_names"),
    ({"data": {"recipe": "english_gender_names", "text": "wikipedio"}}, "/wikipedio': use wikipedia or news (built-in "
     "offline text) or a list of existing text files. Did you mean 'wikipedia'?"),  # a path next to the job file
    ({"evaluation": {"goals": ["female", "blance"]}}, "evaluation.goals has 'blance'"),
    ({"model_class": "seq2seq"}, "model_class is 'seq2seq'; allowed values: auto, causal_lm, masked_lm"),
    ({"evaluation": {"benchmarks": ["seat"]}}, "Unknown benchmark 'seat'; choose from ['bbq', 'crows_pairs',"),
    ({"evaluation": {"benchmarks": {"crows_pairs": "gendr"}}}, "Unknown CrowS-Pairs bias type ['gendr']; choose from"),
    ({"evaluation": {"benchmarks": {"winogender": "gender"}}}, "winogender has no subsets"),
    ({"evaluation": {"benchmark_goals": ["-male"]}}, "evaluation.benchmark_goals has '-male', which is not among"),
])
def test_a_bad_job_file_fails_at_once_naming_the_key_and_the_fix(tmp_path, capsys, change, message):
    job = write_job(tmp_path, **change)
    assert main(["run", str(job)]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not (tmp_path / "run").exists()  # nothing was started


def test_the_benchmarks_judge_the_saved_models_edit_unless_other_goals_are_listed(tmp_path):
    """Each judged model costs a pass over every benchmark: by default the base and the rewrite goal's edit (the model
    the job saves); benchmark_goals lists others, in the goals' canonical spelling."""
    assert JobConfig.from_file(write_job(tmp_path)).benchmark_goals == ["balance"]
    assert JobConfig.from_file(write_job(tmp_path, rewrite="female")).benchmark_goals == ["female"]
    listed = write_job(tmp_path, evaluation={"goals": ["balance", "male", "-female"],
                                             "benchmark_goals": ["weaken:female", "balance"]})
    assert JobConfig.from_file(listed).benchmark_goals == ["-female", "balance"]


def test_a_run_whose_encoder_did_not_converge_fails_loudly_and_ships_nothing(tmp_path, capsys):
    """One training step cannot converge (the best step must be > 0 and both classes separated): every seed tried is
    reported, report.md starts with the failure, no adapter and no edited model are written, and the exit code is 3."""
    job = write_job(tmp_path, seeds=[1, 2])
    code = main(["run", str(job), "--set", "training.max_steps=1", "--set", "training.eval_steps=1",
                 "--set", "training.save_steps=1"])
    err = capsys.readouterr().err
    assert code == 3
    assert "gradiend-hf run: FAILED: the encoder is not usable, so no edit was made: no seed converged" in err, err
    run = tmp_path / "run"
    report = (run / "report.md").read_text().splitlines()
    assert report[0].startswith("# GRADIEND run FAILED") and "no edit was made" in report[2]
    assert "seed 1:" in report[2] and "seed 2:" in report[2]
    assert not (run / "adapter").exists() and not (run / "models").exists()
    training = json.loads((run / "results" / "training.json").read_text())
    assert training["seeds_tried"] == 2 and training["seeds_converged"] == 0 and not training["chosen_converged"]


def test_an_encoder_below_the_held_out_bar_stops_before_any_edit(tmp_path, capsys, monkeypatch):
    """Converged on the validation rows but below the report's bar on held-out rows (the bar is raised past 1 here):
    the run stops before the decoder grid, chooses no edit and saves no model, and exits 3."""
    from gradiend_hf.app import report

    monkeypatch.setattr(report, "ENCODER_BAR", 1.01)
    job = write_job(tmp_path)
    assert main(["run", str(job)]) == 3
    assert "held-out encoder |correlation|" in capsys.readouterr().err
    run = tmp_path / "run"
    assert (run / "report.md").read_text().startswith("# GRADIEND run FAILED")
    assert json.loads((run / "results" / "encoder.json").read_text())["correlation"] < 1.01
    assert not (run / "results" / "evaluation.json").exists() and not (run / "models").exists()


def test_bad_overrides_and_missing_steps_are_explained(tmp_path, capsys):
    job = write_job(tmp_path)
    assert main(["run", str(job), "--set", "training.max_steps"]) == 2
    assert "write it as section.key=value" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "nowhere")]) == 2
    assert "gradiend-hf train" in capsys.readouterr().err


def test_job_files_round_trip_and_the_shipped_demo_config_is_the_embedded_demo(tmp_path):
    demo = demo_job()
    demo.save(tmp_path / "demo.yaml")
    assert JobConfig.from_file(tmp_path / "demo.yaml") == demo
    shipped = JobConfig.from_file(ROOT / "examples" / "configs" / "demo_smollm2.yaml")
    assert shipped == demo
    (tmp_path / "job.toml").write_text("model = 'x'")
    with pytest.raises(JobConfigError, match="use a .yaml, .yml or .json file"):
        JobConfig.from_file(tmp_path / "job.toml")


def test_python_dash_m_is_the_same_command():
    done = subprocess.run([sys.executable, "-m", "gradiend_hf", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0 and "train" in done.stdout and "rewrite" in done.stdout and "demo" in done.stdout


def test_train_under_accelerate_launch_with_two_processes_equals_one_process_with_the_whole_batch(tmp_path):
    """The CLI's train under `accelerate launch` (2 CPU processes, the bottleneck sharded): one run folder, written
    once, and the adapter of 2 processes x 2 rows equals the adapter of 1 process with batches of 4 rows (the sharded
    trainer tests' oracle; every process takes part in saving the sharded adapters). Four steps
    do not converge, so both exit 3 without a run adapter (the launcher reports its workers' 3 and exits 1) and the one
    report.md says so; the last checkpoints are compared. Only the main process writes the run folder: one run id
    (run.json) stamps every result, and no other process left a claim or a half-written file behind.
    (tests/test_multiprocess.py covers the trainer under accelerate, not the CLI's run folder.)"""
    from test_multiprocess import CONFIG, free_port, run

    job = write_job(tmp_path, kind="gpt2", training={"learning_rate": 1e-2, "max_steps": 4, "eval_steps": 2,
                                                     "save_steps": 2, "per_device_train_batch_size": 2,
                                                     "disable_tqdm": True})
    run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIG), "--main_process_port",
         str(free_port()), "-m", "gradiend_hf", "train", str(job), "--output-dir", str(tmp_path / "two")], returncode=1)
    run([sys.executable, "-m", "gradiend_hf", "train", str(job), "--output-dir", str(tmp_path / "one"),
         "--set", "training.per_device_train_batch_size=4"], returncode=3)
    assert not (tmp_path / "two" / "adapter").exists() and not (tmp_path / "one" / "adapter").exists()
    assert (tmp_path / "two" / "report.md").read_text().startswith("# GRADIEND run FAILED")
    last = Path("training") / "seed-1" / "checkpoint-4"
    two = GradiendModel.from_pretrained(tiny_model("gpt2"), tmp_path / "two" / last)
    one = GradiendModel.from_pretrained(tiny_model("gpt2"), tmp_path / "one" / last)
    untrained = get_gradiend_model(tiny_model("gpt2"), GradiendConfig(feature_classes=["female", "male"], init_seed=1))
    for a, b, init in zip(two.bottleneck.parameters(), one.bottleneck.parameters(), untrained.bottleneck.parameters()):
        # summation order differs (Adam amplifies it near g=0); 4 steps move ~4e-2
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
        assert not torch.allclose(a, init, atol=1e-3)
    assert json.loads((tmp_path / "two" / "results" / "training.json").read_text())["steps"] == 4
    two_run = tmp_path / "two"
    run_id = json.loads((two_run / "run.json").read_text())["run_id"]
    assert {json.loads((two_run / "results" / name).read_text())["run_id"]
            for name in ("training.json", "data.json")} == {run_id}
    assert sorted(p.name for p in two_run.iterdir()) == ["data", "job.yaml", "plots", "report.md", "results",
                                                         "run.json", "training"]  # no temporaries of a second writer
    assert sorted(p.name for p in (two_run / "results").iterdir()) == ["data.json", "timings.json", "training.json"]
    assert sorted(p.name for p in (tmp_path / "two" / "training" / "seed-1").glob("checkpoint-*")) == [
        "checkpoint-2", "checkpoint-4"]


def test_a_field_added_later_leaves_an_older_jobs_file_and_fingerprint_as_they_were(tmp_path):
    """A run folder records its job's fingerprint; evaluation.benchmarks came later and is written only when set, so
    a job file of an older run reads back to the same dict (and hash) and the run stays valid."""
    import hashlib

    from gradiend_hf.app.runfolder import fingerprint

    job = JobConfig.from_file(write_job(tmp_path))
    old = yaml.safe_load((tmp_path / "job.yaml").read_text())
    content = {k: v for k, v in job.to_dict().items() if k != "output_dir"}
    assert set(content["evaluation"]) == set(EvaluationSpec.__dataclass_fields__) - {"benchmarks", "benchmark_limit",
                                                                                      "benchmark_goals", "search"}
    assert set(old["evaluation"]) <= set(content["evaluation"])
    expected = hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode("utf-8")).hexdigest()
    assert fingerprint(job) == expected
    with_benchmarks = dataclasses.replace(job, evaluation=dataclasses.replace(job.evaluation, benchmarks=["bbq"]))
    assert with_benchmarks.to_dict()["evaluation"]["benchmarks"] == ["bbq"]
    assert fingerprint(with_benchmarks) != fingerprint(job)
