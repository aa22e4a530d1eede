"""`gradiend-hf` under bad input and faults: a job is validated (types included) before anything is written or loaded,
one run folder holds one run (refused, replaced with --overwrite, continued with --resume, checked when read),
folder names made from class names are safe, and `push` uploads only the files of an adapter or a model."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_cli import write_job
from tiny import tiny_model

from gradiend_hf import GradiendConfig, get_gradiend_model
from gradiend_hf.app import pipeline
from gradiend_hf.app.cli import main, read_job
from gradiend_hf.app.job import JobConfig
from gradiend_hf.trainer import GradiendTrainer


class Interrupted(Exception):
    """Stands in for a kill in the middle of training."""


def snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`, by relative path."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def edit_job(path: Path, **changes) -> Path:
    """A new job file beside `path`: its job with top-level values replaced (the training, evaluation and gradiend
    sections updated key by key)."""
    job = yaml.safe_load(path.read_text())
    for key, value in changes.items():
        merge = key in ("training", "evaluation", "gradiend") and isinstance(value, dict)
        job[key] = {**job.get(key, {}), **value} if merge else value
    edited = path.with_name(f"{path.stem}-{uuid.uuid4().hex[:6]}.yaml")
    edited.write_text(yaml.safe_dump(job))
    return edited


def no_work(monkeypatch) -> None:
    """Building data or loading a model fails the test: a refusal must come before both."""
    def refuse(*args, **kwargs):
        raise AssertionError("data was built or a model loaded before the input was checked")

    monkeypatch.setattr(pipeline, "build_data", refuse)
    monkeypatch.setattr(pipeline, "load_base", refuse)


def interrupt_training_at(monkeypatch, step: int) -> list[int]:
    """GradiendTrainer.training_step raises Interrupted at call `step`; returns the list the calls are counted in."""
    calls, original = [], GradiendTrainer.training_step

    def step_or_stop(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == step:
            raise Interrupted(f"killed in step {step}")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(GradiendTrainer, "training_step", step_or_stop)
    return calls


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """One finished `gradiend-hf run` of test_cli's tiny job (folder `run`), made once; tests copy it."""
    root = tmp_path_factory.mktemp("finished")
    assert main(["run", str(write_job(root))]) == 0
    return root


@pytest.fixture
def copied(finished, tmp_path) -> tuple[Path, Path]:
    """(job file, run folder): a copy of the finished run with its job file, in this test's tmp_path."""
    shutil.copytree(finished, tmp_path, dirs_exist_ok=True)
    job = edit_job(tmp_path / "job.yaml", output_dir=str(tmp_path / "run"))  # the same job: output_dir is not part
    return job, tmp_path / "run"                                              # of the job's fingerprint


# --- A. the whole job is validated before anything is written or loaded --------------------------------------------
@pytest.mark.parametrize("change, message", [
    ({"seeds": 5}, "seeds: expected a list of integers; got 5 (an integer): write a list, e.g. [5]."),
    ({"evaluation": {"decoder_rows": "24"}},
     "evaluation.decoder_rows: expected an integer; got '24' (a string): write numbers without quotes."),
    ({"training": {"learning_rate": "fast"}}, "training.learning_rate: expected a number"),
    ({"training": {"max_steps": 1.5}}, "training.max_steps: expected an integer; got 1.5 (a number)"),
    ({"gradiend": {"feature_classes": ["female", "male"], "decoder_bias": "false"}},
     "gradiend.decoder_bias: expected true or false; got 'false' (a string): write true or false without quotes."),
    ({"data": "rows.jsonl"}, "data: expected a mapping of keys"),
    ({"model": "/no/such/model-folder"}, "model: the folder /no/such/model-folder does not exist"),
    ({"data": {"train": "/no/train.jsonl", "validation": "/no/v.jsonl", "test": "/no/t.jsonl"}},
     "data.train: the file /no/train.jsonl does not exist."),
    ({"data": {"recipe": "english_gender_names", "options": {"top_nmes": 5}}},
     "data.options do not fit recipe 'english_gender_names'"),
    ({"training": {"eval_steps": 30, "save_steps": 25}}, "training: "),  # transformers: save must be a multiple
    ({"training": {"resume_from_checkpoint": True}}, "continue an interrupted run with `gradiend-hf run JOB --resume`"),
    ({"training": {"push_to_hub": True}}, "push the adapter or a rewritten model with `gradiend-hf push`"),
    ({"gradiend": {"feature_classes": ["balance", "male"]}}, "a class may not be called 'balance'"),
    ({"gradiend": {"feature_classes": ["-female", "male"]}}, "starts with '-'"),
    ({"seeds": [1, 1]}, "seeds must be different integers"),
])
def test_a_bad_job_is_refused_before_any_data_or_model_naming_the_field(tmp_path, capsys, monkeypatch, change,
                                                                        message):
    job = edit_job(write_job(tmp_path), **change)
    no_work(monkeypatch)
    assert main(["run", str(job)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    assert f"job file {job}" in err or "job for " in err
    assert not (tmp_path / "run").exists()  # nothing was written


def test_every_bad_value_is_named_at_once(tmp_path, capsys, monkeypatch):
    job = edit_job(write_job(tmp_path), seeds=5, evaluation={"decoder_rows": "24", "lms_ratio": "high"},
                   training={"max_steps": "100"})
    no_work(monkeypatch)
    assert main(["train", str(job)]) == 2
    err = capsys.readouterr().err
    assert f"job file {job} has 4 problems:" in err, err
    for field in ("seeds:", "evaluation.decoder_rows:", "evaluation.lms_ratio:", "training.max_steps:"):
        assert f"  - {field} expected" in err, field


def test_yaml_1_1_floats_are_read_as_numbers_in_number_fields(tmp_path):
    """PyYAML (YAML 1.1) reads `1e-3` as a string; a number field takes it as the number it spells, a string field
    keeps the string."""
    job = write_job(tmp_path)
    text = job.read_text()
    text = re.sub(r"learning_rate: .*", "learning_rate: 1e-3", text)
    text = text.replace("lms_ratio: 0.9", "lms_ratio: 9e-1")
    job.write_text(text)
    assert yaml.safe_load(text)["training"]["learning_rate"] == "1e-3"  # what PyYAML gives
    loaded = JobConfig.from_file(job)
    assert loaded.training["learning_rate"] == 0.001 and isinstance(loaded.training["learning_rate"], float)
    assert loaded.evaluation.lms_ratio == 0.9
    assert loaded.training_arguments(tmp_path / "t").learning_rate == 0.001
    overridden = read_job(str(job), ["training.learning_rate=2E-2", "evaluation.learning_rates=[1e-1, 1]",
                                     "model=1e5"], None)
    assert overridden.training["learning_rate"] == 0.02 and overridden.evaluation.learning_rates == [0.1, 1]
    assert overridden.model == "1e5"  # a string field keeps the string


@pytest.mark.parametrize("text, message", [
    ("model: !!python/object/apply:os.system ['touch {marker}']\n", "python/object/apply:os.system"),
    ("model: smollm2\ndata: [unclosed\n", "is not valid YAML at line 3"),
    ("training: {max_steps: 5}\ntraining: {learning_rate: 0.1}\n", "key 'training' is given twice"),
])
def test_a_job_file_that_does_not_parse_is_a_clear_error(tmp_path, capsys, monkeypatch, text, message):
    marker = tmp_path / "executed"
    job = tmp_path / "job.yaml"
    job.write_text(text.replace("{marker}", str(marker)))
    no_work(monkeypatch)
    assert main(["run", str(job)]) == 2
    err = capsys.readouterr().err
    assert f"Job file {job}" in err and message in err and "Traceback" not in err, err
    assert not marker.exists()


def test_bad_json_bad_bytes_and_bad_overrides_are_clear_errors(tmp_path, capsys, monkeypatch):
    no_work(monkeypatch)
    (tmp_path / "job.json").write_text('{"model": "smollm2",\n "seeds": [1,]}')
    assert main(["train", str(tmp_path / "job.json")]) == 2
    assert f"Job file {tmp_path / 'job.json'} is not valid JSON" in capsys.readouterr().err
    (tmp_path / "latin.yaml").write_bytes("model: caf\xe9\n".encode("latin-1"))
    assert main(["train", str(tmp_path / "latin.yaml")]) == 2
    assert "is not UTF-8 text" in capsys.readouterr().err
    job = write_job(tmp_path)
    assert main(["run", str(job), "--set", "seeds=[1,"]) == 2
    err = capsys.readouterr().err
    assert "--set 'seeds=[1,': the value is not valid YAML" in err and "Traceback" not in err, err
    assert main(["run", str(job), "--set", "training.learning_rate=!!python/name:os.system"]) == 2
    assert "YAML tags such as !!python/object are not allowed" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# --- B. one run folder holds one run ---------------------------------------------------------------------------------
def test_a_folder_holding_a_run_is_refused_and_left_untouched(copied, capsys, monkeypatch):
    job, run = copied
    before = snapshot(run)
    no_work(monkeypatch)
    assert main(["run", str(job)]) == 2  # the same job again: not without --resume or --overwrite
    err = capsys.readouterr().err
    assert f"{run} already holds a run (finished, of the same job)" in err and "--resume" in err, err
    other = edit_job(job, training={"max_steps": 50})
    assert main(["train", str(other)]) == 2
    err = capsys.readouterr().err
    assert "of a different job (training.max_steps: 100 in the folder, 50 now)" in err, err
    assert main(["train", str(other), "--resume"]) == 2  # resume is for the same job only
    assert "--resume: " in capsys.readouterr().err
    failing = edit_job(job, data={"train": str(job.parent / "missing.jsonl")})
    assert main(["run", str(failing)]) == 2
    assert snapshot(run) == before  # job.yaml, adapter, results: nothing of another job was written


def test_overwrite_replaces_the_run_cleanly_and_a_foreign_folder_is_never_touched(copied, tmp_path, capsys,
                                                                                   monkeypatch):
    job, run = copied
    old_id = json.loads((run / "run.json").read_text())["run_id"]
    other = edit_job(job, training={"max_steps": 1, "eval_steps": 1, "save_steps": 1})
    interrupt_training_at(monkeypatch, 1)
    with pytest.raises(Interrupted):
        main(["train", str(other), "--overwrite"])
    record = json.loads((run / "run.json").read_text())
    assert record["run_id"] != old_id
    assert yaml.safe_load((run / "job.yaml").read_text())["training"]["max_steps"] == 1
    assert {p.name for p in run.iterdir()} <= {"data", "job.yaml", "results", "run.json", "training"}
    assert not list(tmp_path.glob(".run.*"))  # the old run was moved aside and deleted
    # the interrupted new run has no adapter: rewrite refuses instead of merging the old run's adapter
    assert main(["rewrite", str(run)]) == 2
    assert "holds no adapter" in capsys.readouterr().err

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    (foreign / "job.yaml").write_text("model: x\n")
    for flags in ([], ["--overwrite"], ["--resume"]):
        assert main(["run", str(job), "--output-dir", str(foreign), *flags]) == 2
        assert f"{foreign} is not a run folder (it holds notes.txt)" in capsys.readouterr().err
    assert sorted(p.name for p in foreign.iterdir()) == ["job.yaml", "notes.txt"]


def test_commands_that_read_a_run_refuse_a_folder_that_mixes_runs(copied, tmp_path, capsys, monkeypatch):
    job, run = copied
    no_work(monkeypatch)
    original = (run / "job.yaml").read_text()
    (run / "job.yaml").write_text(original.replace("max_steps: 100", "max_steps: 99"))
    for command in (["rewrite", str(run)], ["evaluate", str(run)], ["report", str(run)]):
        assert main(command) == 2
        assert "is not the job this run was started with" in capsys.readouterr().err
    (run / "job.yaml").write_text(original)

    evaluation = run / "results" / "evaluation.json"
    kept = evaluation.read_text()
    evaluation.write_text(json.dumps({**json.loads(kept), "run_id": "0" * 32}))
    assert main(["rewrite", str(run), "--goal", "male"]) == 2
    assert f"{evaluation} was written by another run" in capsys.readouterr().err
    evaluation.write_text(kept)

    other = get_gradiend_model(tiny_model("bert"), GradiendConfig(feature_classes=["female", "male"], init_seed=7))
    other.save_pretrained(run / "adapter")  # another run's adapter for the same base
    assert main(["rewrite", str(run)]) == 2
    assert "is not the adapter this run's training saved" in capsys.readouterr().err

    legacy = tmp_path / "legacy"
    shutil.copytree(run, legacy)
    (legacy / "run.json").unlink()
    assert main(["evaluate", str(legacy)]) == 2
    assert "has no run.json: it was made by an older gradiend-hf" in capsys.readouterr().err


def test_resume_continues_an_interrupted_run_from_its_last_complete_checkpoint(finished, tmp_path, monkeypatch):
    """Killed in step 60 (checkpoints at 25 and 50): --resume trains steps 51-100 only, reuses the saved data and
    checkpoints, and ends with the adapter of the uninterrupted run."""
    job = write_job(tmp_path)
    run = tmp_path / "run"
    interrupt_training_at(monkeypatch, 60)
    with pytest.raises(Interrupted):
        main(["run", str(job)])
    monkeypatch.undo()
    seed = run / "training" / "seed-1"
    assert sorted(p.name for p in seed.glob("checkpoint-*")) == ["checkpoint-25", "checkpoint-50"]
    kept = {p: p.stat().st_mtime_ns for p in [*seed.glob("checkpoint-*/*"), *(run / "data").rglob("*")]}

    calls = interrupt_training_at(monkeypatch, 10_000)  # counts the steps taken
    assert main(["run", str(job), "--resume"]) == 0
    assert len(calls) == 50
    assert [p for p, t in kept.items() if p.stat().st_mtime_ns != t] == []  # read, not rewritten
    resumed = load_file(run / "adapter" / "adapter_model.safetensors")
    straight = load_file(finished / "run" / "adapter" / "adapter_model.safetensors")
    assert resumed.keys() == straight.keys()
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=1e-5, atol=1e-9)
    assert json.loads((run / "results" / "training.json").read_text())["steps"] == 100
    assert (run / "report.md").read_text().startswith("# GRADIEND run:")


# --- C. folder names made from class names ---------------------------------------------------------------------------
HOSTILE = ["../../escaped", "..", ".", ".hidden", "a/b", "a\\b", "non-binary", "weaken-female", "strengthen-x",
           "Female", "female", "x y", "ünï", "%2e", "%2E", "con", "a" * 30]


def test_class_names_become_safe_and_distinct_folder_names(tmp_path):
    from gradiend_hf.app.names import goal_folder, safe_name
    from gradiend_hf.app.runfolder import RunFolder

    goals = ["balance", *HOSTILE, *(f"-{name}" for name in HOSTILE)]
    folders = [goal_folder(goal) for goal in goals]
    for goal, folder in zip(goals, folders):
        assert re.fullmatch(r"[a-z0-9_%-]+", folder), (goal, folder)
        assert not folder.startswith(".") and ".." not in folder and os.sep not in folder
        assert RunFolder(tmp_path).model(goal).parent == tmp_path / "models"
    assert len({f.lower() for f in folders}) == len(goals)  # distinct, also on case-insensitive file systems
    assert goal_folder("non-binary") == "strengthen-non-binary" and goal_folder("-non-binary") == "weaken-non-binary"
    assert goal_folder("../../escaped") == "strengthen-%2e%2e%2f%2e%2e%2fescaped"
    assert safe_name("ünï") == "%c3%bcn%c3%af"


def test_a_run_with_hostile_class_names_writes_only_inside_its_folder(tmp_path, capsys):
    classes = {"female": "../../escaped", "male": "non-binary"}
    job_path = write_job(tmp_path / "work", gradiend={"feature_classes": list(classes.values())},
                         evaluation={"decoder_rows": 8, "neutral_texts": 4, "learning_rates": [0.01, 0.1, 1.0],
                                     "lms_ratio": 0.9, "goals": ["balance", "../../escaped", "-non-binary"]})
    job = yaml.safe_load(job_path.read_text())
    for split in ("train", "validation", "test"):
        path = Path(job["data"][split])
        rows = pd.read_json(path, lines=True)
        for column in ("factual_class", "alternative_class"):
            rows[column] = rows[column].map(classes)
        rows.to_json(path, orient="records", lines=True)
    job["rewrite"] = "-non-binary"
    job_path.write_text(yaml.safe_dump(job))
    outside = {p for p in tmp_path.rglob("*") if "run" not in p.relative_to(tmp_path).parts}

    assert main(["run", str(job_path)]) == 0
    run = tmp_path / "work" / "run"
    assert sorted(p.name for p in (run / "models").iterdir()) == ["weaken-non-binary"]
    assert main(["rewrite", str(run), "--goal", "../../escaped"]) == 0
    assert main(["rewrite", str(run), "--feature-factor", "-0.5", "--learning-rate", "0.01"]) == 0
    assert sorted(p.name for p in (run / "models").iterdir()) == [
        "custom-ff-0p5-lr0p01", "strengthen-%2e%2e%2f%2e%2e%2fescaped", "weaken-non-binary"]
    assert {p for p in tmp_path.rglob("*") if "run" not in p.relative_to(tmp_path).parts} == outside
    assert main(["rewrite", str(run), "--goal", "../../x"]) == 2  # a goal that was not evaluated
    assert "no edit was selected for goal '../../x'" in capsys.readouterr().err


# --- D. push uploads the files of an adapter or a model, nothing else ------------------------------------------------
def litter(folder: Path, outside: Path) -> None:
    """What must never be uploaded: secrets, a symlink out of the folder, checkpoints, optimizer state, pickles."""
    outside.write_text("hf_secret_token")
    (folder / ".env").write_text("HF_TOKEN=hf_secret")
    (folder / "token").symlink_to(outside)
    (folder / "checkpoint-5").mkdir()
    (folder / "checkpoint-5" / "adapter_model.safetensors").write_bytes(b"old")
    for name in ("optimizer.safetensors", "optimizer.json", "scheduler.json", "trainer_state.json",
                 "training_args.bin", "pytorch_model.bin"):
        (folder / name).write_bytes(b"state")


def test_push_uploads_only_the_adapter_files_and_lists_them_first(copied, tmp_path, hub, capsys):
    _, run = copied
    adapter = run / "adapter"
    litter(adapter, tmp_path / "outside-token")
    assert main(["push", str(adapter), "user/adapter", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert not hub.calls and "dry run: nothing was uploaded" in out
    assert main(["push", str(adapter), "user/adapter"]) == 0
    (upload,) = hub.uploads
    assert set(upload["files"]) == {"adapter_config.json", "adapter_model.safetensors", "README.md"}
    assert upload["files"]["adapter_model.safetensors"] == (adapter / "adapter_model.safetensors").read_bytes()
    out = capsys.readouterr().out
    listing, pushed = out.index("3 files to upload"), out.index("pushed ")
    assert listing < pushed
    for name in ("adapter_config.json", "adapter_model.safetensors", "README.md"):
        assert f"  {name}  (" in out[listing:pushed]
    for name in (".env (hidden)", "token (symlink out of the folder)", "checkpoint-5/ (folder)",
                 "optimizer.safetensors (not part of an adapter)"):
        assert name in out, name


def test_push_of_a_model_folder_leaves_out_everything_else(copied, tmp_path, hub, capsys):
    _, run = copied
    model = run / "models" / "balance"
    litter(model, tmp_path / "outside-token")
    (model / ".git").mkdir()
    (model / ".git" / "config").write_text("[credential]")
    (model / "README.md").unlink()
    (model / "README.md").symlink_to(tmp_path / "outside-token")  # an allowed name pointing out of the folder
    assert main(["push", str(model), "user/model", "--revision", "v1"]) == 0
    (upload,) = hub.uploads
    expected = {p.name for p in model.iterdir() if p.name in ("config.json", "model.safetensors", "tokenizer.json",
                                                              "tokenizer_config.json", "generation_config.json")}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= expected
    assert set(upload["files"]) == expected and upload["revision"] == "v1"
    assert b"hf_secret" not in b"".join(upload["files"].values())


def test_push_refuses_a_folder_without_weights_before_any_hub_call(tmp_path, hub, capsys):
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{}")
    (folder / "adapter_model.safetensors").symlink_to(tmp_path / "elsewhere.safetensors")
    (tmp_path / "elsewhere.safetensors").write_bytes(b"x")
    assert main(["push", str(folder), "user/x"]) == 2
    assert "adapter folder without adapter_model.safetensors" in capsys.readouterr().err
    assert main(["push", str(tmp_path), "not a repo id"]) == 2
    assert "is not a Hub repo id" in capsys.readouterr().err
    assert not hub.calls
