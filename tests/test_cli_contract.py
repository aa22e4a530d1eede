"""The Hugging Face contract of `gradiend-hf` (issue "The Hugging Face contract"): paths in a job file mean the same
from any folder, goals that start with '-' work on the command line, report.md says only what results/ holds, the
CLI tells its version and explains every option, and job files choose the base's dtype and device_map."""

from __future__ import annotations

import importlib.metadata
import json
import re
import shutil
from pathlib import Path
from typing import Optional

import pandas as pd
import pytest
import torch
import yaml
from test_cli import PROBES, write_job
from test_cli_faults import edit_job, no_work
from tiny import tiny_model
from transformers import AutoModelForMaskedLM

from gradiend_hf import GradiendModel
from gradiend_hf.app import pipeline
from gradiend_hf.app.cli import main, parser, read_job
from gradiend_hf.app.job import EvaluationSpec, JobConfig, JobConfigError
from gradiend_hf.app.preflight import check_job
from gradiend_hf.app.report import ENCODER_BAR, checks, rounding
from gradiend_hf.selection import select_parameters

GOALS = ["balance", "female", "male", "weaken:female"]  # weaken:female is held as -female


def evaluation_section(**changes) -> dict:
    """test_cli.write_job's evaluation section with `changes`."""
    return {"decoder_rows": 8, "neutral_texts": 4, "learning_rates": [0.01, 0.1, 1.0], "neutral_contexts": PROBES,
            "lms_ratio": 0.9, **changes}


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished `gradiend-hf run` of the tiny job that also weakens 'female' (folder `run`), made once."""
    root = tmp_path_factory.mktemp("contract")
    assert main(["run", str(write_job(root, evaluation=evaluation_section(goals=GOALS)))]) == 0
    return root


# --- report.md, read back and compared with results/ --------------------------------------------------------------
def results(run: Path, name: str):
    return json.loads((run / "results" / name).read_text())


def section(report: str, title: str) -> str:
    """The text of `## title` up to the next section."""
    start = report.index(f"## {title}")
    end = report.find("\n## ", start + 1)
    return report[start: end if end > 0 else None]


def table(text: str) -> list[dict[str, str]]:
    """The first Markdown table in `text` as rows of {column: cell}; `\\|` is a | inside a cell."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    split = [[cell.strip().replace("\\|", "|") for cell in re.split(r"(?<!\\)\|", line)[1:-1]] for line in lines]
    header, rows = split[0], split[2:]
    assert all(len(row) == len(header) for row in rows), "a cell holds an unescaped |"
    return [dict(zip(header, row)) for row in rows]


def printed(text: str, value: Optional[float]) -> None:
    """`text` is `value` printed with the significant digits it shows (n/a for None)."""
    if value is None:
        assert text == "n/a"
        return
    shown = float(text.replace(",", ""))
    digits = len(re.sub(r"[^0-9]", "", text.split("e")[0]).lstrip("0")) or 1
    assert shown == pytest.approx(value, rel=0.51 * 10.0 ** (1 - digits), abs=1e-300), (text, value)


def pair(evidence: str) -> tuple[str, str]:
    first, second = re.search(r"(\S+) -> (\S+)", evidence).groups()
    return first, second


def test_report_setup_states_what_was_selected_read_and_timed(finished):
    run = finished / "run"
    report = (run / "report.md").read_text()
    setup = section(report, "Setup")
    training, evaluation, data = results(run, "training.json"), results(run, "evaluation.json"), \
        results(run, "data.json")
    job = yaml.safe_load((finished / "job.yaml").read_text())

    # the selection as selected (embeddings are part of the default selection) and the adapter's size
    base = tiny_model("bert")
    names = select_parameters(base, None, None)
    embeddings = [n for n in names if "embeddings" in n and n.endswith("embeddings.weight")]
    assert embeddings, "the tiny BERT's default selection holds position/token-type embeddings"
    weights = sum(dict(base.named_parameters())[n].numel() for n in names)
    line = next(line for line in setup.splitlines() if line.startswith("- selected parameters:"))
    assert "except embeddings" not in report and "input embeddings included unless tied" in line
    assert f": {len(names)} tensors, {weights:,} weights, of which {len(embeddings)} embedding tensor(s)" in line
    assert all(f"`{name}`" in line for name in embeddings[:3])
    adapter = GradiendModel.from_pretrained(tiny_model("bert"), run / "adapter")
    assert f"-> **{adapter.num_entries:,} weights** in the adapter" in line
    assert training["selected_entries"] == adapter.num_entries == weights  # no pruning in this job

    # the data line names every file with its rows (counted here from the files themselves)
    line = next(line for line in setup.splitlines() if line.startswith("- data:"))
    for split, path in job["data"].items():
        rows = sum(1 for text in Path(path).read_text().splitlines() if text.strip())
        assert f"{split} `{path}` ({rows:,} rows)" in line
        assert data["rows"][split] == rows
    assert "()" not in line

    numbers = re.search(r"held-out rows: (\d+) for the encoder, (\d+) for the decoder grid; (\d+) neutral texts", setup)
    assert [int(n) for n in numbers.groups()] == [evaluation["encoder"]["rows"], evaluation["decoder_rows"],
                                                  evaluation["neutral_texts"]]
    assert evaluation["encoder"]["rows"] == data["rows"]["test"] and evaluation["decoder_rows"] == 8
    steps, batch, rate, tried, converged, seed = re.search(
        r"training: (\d+) steps, batch (\d+) rows per device, learning rate (\S+), seeds tried (\d+) \(converged "
        r"(\d+); chosen seed (\d+)\)", setup).groups()
    assert int(steps) == training["steps"] == job["training"]["max_steps"]
    assert int(batch) == job["training"]["per_device_train_batch_size"]
    assert float(rate) == job["training"]["learning_rate"]
    assert (int(tried), int(converged), int(seed)) == (training["seeds_tried"], training["seeds_converged"],
                                                       training["chosen_seed"])
    grid = pd.read_csv(run / "results" / "decoder_grid.csv")
    search, candidates, lms_only, ratio = re.search(
        r"decoder (\w+): (\d+) candidates scored \(the LMS of (\d+) of them only\); an edit must keep LMS >= (\S+) x "
        r"base", setup).groups()
    assert search == evaluation["search"] == "ladder"
    assert int(candidates) == evaluation["candidates"] == int((~grid["skipped"]).sum())
    assert int(lms_only) == evaluation["lms_only"] == int((~grid["skipped"] & grid["p_female"].isna()).sum())
    assert float(ratio) == job["evaluation"]["lms_ratio"]
    timings = results(run, "timings.json")
    line = next(line for line in setup.splitlines() if line.startswith("- time (seconds): "))
    assert line == "- time (seconds): " + ", ".join(f"{k} {v:g}" for k, v in timings.items())


def test_report_checks_are_computed_from_the_results_and_printed_so_the_difference_shows(finished):
    run = finished / "run"
    rows = table(section((run / "report.md").read_text(), "Checks"))
    evaluation = results(run, "evaluation.json")
    edits, contexts = evaluation["edits"], evaluation["contexts"]
    tolerance = rounding(results(run, "training.json")["base_dtype"])
    assert tolerance == pytest.approx(8 * 2.0 ** -23)  # float32

    def change(before: float, after: float) -> int:  # the rule, written out again
        if after == before or abs(after - before) <= tolerance * max(abs(before), abs(after)):
            return 0
        return 1 if after > before else -1

    expected = {  # claim -> (holds, numbers the evidence shows, in order)
        f"encoder |correlation| >= {ENCODER_BAR} on held-out rows":
            (abs(evaluation["encoder"]["correlation"]) >= ENCODER_BAR, [abs(evaluation["encoder"]["correlation"])]),
        "balance edit brings the classes closer in neutral contexts (mean |log P(female)/P(male)| falls)":
            (change(contexts["base"]["mean_abs_log_ratio"], contexts["balance"]["mean_abs_log_ratio"]) < 0,
             [contexts["base"]["mean_abs_log_ratio"], contexts["balance"]["mean_abs_log_ratio"]]),
        "balance edit keeps LMS >= 0.9 x base": (None, [0.0]),  # the tiny base's LMS is 0: nothing to keep
    }
    for goal, other in (("female", "male"), ("male", "female")):
        m = edits[goal]["metrics"]
        grid_p = f"p_{goal}@{other}"
        expected[f"strengthening {goal!r} raises P({goal}) on the other class's rows"] = (
            change(m["base_score"], m["score"]) > 0, [m["base_score"], m["score"]])
        assert m["score"] == pytest.approx(float(pd.read_csv(run / "results" / "decoder_grid.csv").query(
            f"feature_factor == {edits[goal]['feature_factor']} and learning_rate == {edits[goal]['learning_rate']}"
        )[grid_p].iloc[0]))  # the score is P(class) on the other class's rows
        if goal == "female":  # each class's weakening follows its strengthening
            m = edits["-female"]["metrics"]
            expected["weakening 'female' lowers P(female) on its own rows"] = (
                change(-m["base_score"], -m["score"]) < 0, [-m["base_score"], -m["score"]])
    assert edits["balance"]["metrics"]["base_lms"] == 0

    assert [row["claim"] for row in rows] == list(expected)
    for row in rows:
        holds, values = expected[row["claim"]]
        assert row["holds"] == {True: "yes", False: "**no**", None: "n/a"}[holds], row
        shown = re.findall(r"-?\d+(?:\.\d+)?(?:e[-+]?\d+)?", row["evidence"].split(";")[0].split("(")[0])
        if row["claim"].startswith("encoder"):
            shown = [re.search(r"\|correlation\| (\S+)", row["evidence"]).group(1)]
        assert len(shown) == len(values), row
        for text, value in zip(shown, values):
            printed(text, value)
        if holds and len(shown) == 2:  # a change that holds is visible in the printed numbers
            assert shown[0] != shown[1] and (float(shown[1]) > float(shown[0])) == (values[1] > values[0]), row
    assert "the base's LMS is 0" in rows[2]["evidence"]


def test_report_tables_and_sentences_equal_the_results(finished):
    run = finished / "run"
    report = (run / "report.md").read_text()
    evaluation = results(run, "evaluation.json")
    (encoder,) = table(section(report, "Encoder"))
    enc = evaluation["encoder"]
    for column, key in (("correlation", "correlation"), ("binary accuracy", "binary_accuracy"),
                        ("ternary accuracy", "ternary_accuracy"), ("mean h (female)", "mean_h_female"),
                        ("mean h (male)", "mean_h_male"), ("neutral mean abs h", "neutral_mean_abs_h")):
        printed(encoder[column], enc[key])

    edits = table(section(report, "Edits"))
    assert [row["goal"] for row in edits] == list(evaluation["edits"]) == ["balance", "female", "male", "-female"]
    for row in edits:
        record = evaluation["edits"][row["goal"]]
        m = record["metrics"]
        printed(row["feature factor"], record["feature_factor"])
        printed(row["learning rate"], record["learning_rate"])
        for c in ("female", "male"):
            printed(row[f"P({c}) base"], m["base_probabilities"][c])
            printed(row[f"P({c})"], m["probabilities"][c])
            if m["probabilities"][c] != m["base_probabilities"][c]:
                assert row[f"P({c}) base"] != row[f"P({c})"]  # printed with the digits that tell them apart
        printed(row["LMS base"], m["base_lms"])
        printed(row["LMS"], m["lms"])
        printed(row["perplexity base"], m["base_perplexity"])
        printed(row["perplexity"], m["perplexity"])

    neutral = section(report, "Neutral contexts")
    assert f"{len(PROBES)} sentences in which the class is left open, e.g. \"{PROBES[0]}\"" in neutral
    for row in table(neutral):
        c = evaluation["contexts"][row["model"]]
        for column, key in (("P(female)", "p_female"), ("P(male)", "p_male"), ("P(female)/P(male)", "ratio"),
                            ("mean abs log ratio", "mean_abs_log_ratio")):
            printed(row[column], c[key])
    assert [row["model"] for row in table(neutral)] == list(evaluation["contexts"])

    saved = section(report, "The saved model")
    reload = results(run, "reload.json")
    p_female, p_male, diff = re.search(r"P\(female\) (\S+), P\(male\) (\S+) in the neutral contexts \(largest "
                                       r"difference to the table above: (\S+)\)", saved).groups()
    printed(p_female, reload["contexts"]["p_female"])
    printed(p_male, reload["contexts"]["p_male"])
    expected = max(abs(reload["contexts"][k] - evaluation["contexts"]["balance"][k]) for k in reload["contexts"])
    printed(diff, expected)
    # the snippet loads the saved masked LM with the class that fits it
    assert "AutoModelForMaskedLM.from_pretrained" in saved and "AutoModelForCausalLM" not in saved
    assert isinstance(AutoModelForMaskedLM.from_pretrained(reload["folder"]), torch.nn.Module)


def verdicts(evaluation: dict) -> dict[str, tuple[Optional[bool], str]]:
    return {claim: (ok, evidence) for claim, ok, evidence in checks(evaluation, ["a", "b"], lms_ratio=0.9)}


def edit(score: float, base_score: float, lms: float = 1.0, base_lms: float = 1.0) -> dict:
    return {"metrics": {"score": score, "base_score": base_score, "lms": lms, "base_lms": base_lms}}


@pytest.mark.parametrize("base_score, score, holds", [
    (1.0e-5, 1.2e-5, True),       # a real rise in small numbers: shown as 1e-05 -> 1.2e-05, never 0.0000 -> 0.0000
    (0.0, 0.0, False),            # equal: no rise
    (0.5, 0.5 * (1 + 1e-8), False),  # float32 rounding: no rise
    (0.123456, 0.123457, True),   # 8e-6 relative: a rise; printed with the digits that show it
    (0.2, 0.1, False),
])
def test_a_claim_holds_only_for_a_change_and_shows_it(base_score, score, holds):
    evaluation = {"encoder": {"correlation": 0.95}, "edits": {"a": edit(score, base_score)}}
    ok, evidence = verdicts(evaluation)["strengthening 'a' raises P(a) on the other class's rows"]
    assert ok is holds
    before, after = pair(evidence)
    printed(before, base_score)
    printed(after, score)
    assert (before != after) == (score != base_score)
    if score != base_score and not holds and abs(score - base_score) < 1e-6:
        assert "the same within rounding" in evidence


def test_bars_use_the_job_values_and_print_enough_digits():
    evaluation = {"encoder": {"correlation": -0.79996},
                  "edits": {"balance": edit(0.0, 0.0, lms=0.95, base_lms=1.0), "-a": edit(-0.2, -0.3)}}
    got = verdicts(evaluation)
    ok, evidence = got[f"encoder |correlation| >= {ENCODER_BAR} on held-out rows"]
    assert ok is False and "|correlation| 0.79996" in evidence  # not 0.8000 next to a failed bar of 0.8
    ok, evidence = got["balance edit keeps LMS >= 0.9 x base"]  # the job's lms_ratio 0.9, not a fixed 0.99
    assert ok is True and evidence == "LMS 0.95 vs 0.9 x base 1 = 0.9"
    ok, evidence = got["weakening 'a' lowers P(a) on its own rows"]  # score of -a is -P(a) on a's rows
    assert ok is True and pair(evidence) == ("0.3", "0.2")
    no_base = {"encoder": {"correlation": 0.9}, "edits": {"balance": edit(0.0, 0.0, lms=0.0, base_lms=0.0)}}
    assert verdicts(no_base)["balance edit keeps LMS >= 0.9 x base"][0] is None
    # bfloat16 results are rounded far more coarsely: a 1% difference is no change there
    assert rounding("bfloat16") == pytest.approx(8 * 2.0 ** -7) and rounding("torch.float32") < 1e-6
    rise = {"encoder": {"correlation": 0.9}, "edits": {"a": edit(0.101, 0.1)}}
    assert checks(rise, ["a", "b"], tolerance=rounding("bfloat16"))[1][1] is False
    assert checks(rise, ["a", "b"], tolerance=rounding("float32"))[1][1] is True


# --- 1. paths in a job file are relative to the job file ----------------------------------------------------------
def job_in_folder(tmp_path: Path) -> Path:
    """test_cli's tiny job moved into jobs/ with every path written relative to jobs/."""
    folder = tmp_path / "jobs"
    folder.mkdir()
    job = yaml.safe_load(write_job(folder).read_text())
    (folder / "rows").mkdir()
    for split, path in job["data"].items():
        shutil.move(path, folder / "rows" / Path(path).name)
        job["data"][split] = f"rows/{Path(path).name}"
    job["model"], job["output_dir"] = "base", "runs/tiny"
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def test_relative_paths_in_a_job_file_are_relative_to_the_job_file(tmp_path, monkeypatch):
    path = job_in_folder(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    job = read_job(str(Path("..") / "jobs" / "job.yaml"), [], None)
    folder = (elsewhere / ".." / "jobs").absolute()
    assert job.model == str(folder / "base") and job.output_dir == str(folder / "runs" / "tiny")
    assert job.data.train == str(folder / "rows" / "train.jsonl") and job.data.neutral == str(folder / "rows" /
                                                                                             "neutral.txt")
    check_job(job, evaluates=True)  # every file found, from another folder
    assert {name: len(split) for name, split in pipeline.build_data(job).items()} == {
        "train": 20, "validation": 12, "test": 12, "neutral": 4}
    # --set and --output-dir are typed in the current folder: relative to it
    overridden = read_job(str(path), ["data.neutral=texts.txt"], "runs/here")
    assert overridden.data.neutral == "texts.txt" and overridden.output_dir == "runs/here"


def test_a_job_relative_model_that_is_missing_is_named_with_its_folder(tmp_path, capsys, monkeypatch):
    path = job_in_folder(tmp_path)
    assert read_job(str(path), [], None).model == str(path.parent.absolute() / "base")
    hub = edit_job(path, model="user/tiny-model")  # no such folder next to the job: a Hub id stays a Hub id
    assert read_job(str(hub), [], None).model == "user/tiny-model"
    missing = edit_job(path, model="./no-model")
    no_work(monkeypatch)
    assert main(["run", str(missing)]) == 2
    err = capsys.readouterr().err
    assert f"the folder {path.parent.absolute() / 'no-model'} does not exist" in err
    assert "relative to the job file's folder" in err


# --- 2. goals that start with '-' -------------------------------------------------------------------------------
def test_weaken_goals_work_on_the_command_line_in_every_spelling(finished, tmp_path, capsys):
    run = finished / "run"
    assert yaml.safe_load((run / "job.yaml").read_text())["evaluation"]["goals"] == ["balance", "female", "male",
                                                                                      "-female"]
    spellings = {"space": ["--goal", "-female"], "equals": ["--goal=-female"], "alias": ["--goal", "weaken:female"]}
    for name, option in spellings.items():
        assert main(["rewrite", str(run), *option, "--output", str(tmp_path / name)]) == 0, name
    weights = {name: (tmp_path / name / "model.safetensors").read_bytes() for name in spellings}
    assert len(set(weights.values())) == 1
    record = results(run, "evaluation.json")["edits"]["-female"]
    expected = GradiendModel.from_pretrained(tiny_model("bert"), run / "adapter").merge_and_unload(
        feature_factor=record["feature_factor"], learning_rate=record["learning_rate"])
    merged = AutoModelForMaskedLM.from_pretrained(tmp_path / "space")
    for (name, p), (_, q) in zip(expected.named_parameters(), merged.named_parameters()):
        assert torch.equal(p, q), name
    assert main(["rewrite", str(run), "--goal", "-female"]) == 0  # default folder: models/weaken-female
    assert (run / "models" / "weaken-female" / "config.json").is_file()
    assert main(["rewrite", str(run), "--goal", "strengthen:female", "--output", str(tmp_path / "s")]) == 0
    assert main(["rewrite", str(run), "--goal", "female", "--output", str(tmp_path / "f")]) == 0
    assert (tmp_path / "s" / "model.safetensors").read_bytes() == (tmp_path / "f" / "model.safetensors").read_bytes()
    capsys.readouterr()
    assert main(["rewrite", str(run), "--goal", "-male"]) == 2  # not evaluated: named, with the evaluated goals
    assert "no edit was selected for goal '-male'; evaluated goals: ['balance', 'female', 'male', '-female']" in \
        capsys.readouterr().err


def test_goal_prefixes_cannot_be_class_names(tmp_path):
    with pytest.raises(JobConfigError, match="'weaken:x' starts with 'weaken:'"):
        JobConfig(gradiend={"feature_classes": ["weaken:x", "y"]})
    job = JobConfig(gradiend={"feature_classes": ["a", "b"]}, evaluation=EvaluationSpec(goals=["balance", "weaken:b"]),
                    rewrite="weaken:b")
    assert job.evaluation.goals == ["balance", "-b"] and job.rewrite == "-b"  # held in the canonical spelling
    assert JobConfig(gradiend={"feature_classes": ["a", "b"]}, rewrite="strengthen:a").rewrite == "a"


# --- 4. --version and help on everything ---------------------------------------------------------------------------
def test_version_and_help_on_every_argument(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out == f"gradiend-hf {importlib.metadata.version('gradiend_hf')}\n"
    top = parser()
    (commands,) = [a for a in top._actions if a.dest == "command"]
    assert {c.dest for c in commands._choices_actions} == set(commands.choices)
    assert all(c.help for c in commands._choices_actions)
    for name, command in [("gradiend-hf", top), *commands.choices.items()]:
        for action in command._actions:
            assert action.help and action.help.strip() and action.help != "==SUPPRESS==", (name, action.dest)


# --- 6. model.dtype and model.device_map ---------------------------------------------------------------------------
def test_a_bfloat16_base_on_the_cpu_device_map_loads_and_runs(tmp_path):
    path = write_job(tmp_path)
    raw = yaml.safe_load(path.read_text())
    raw["model"] = {"name": raw["model"], "dtype": "bfloat16", "device_map": "cpu"}
    path.write_text(yaml.safe_dump(raw))
    job = JobConfig.from_file(path)
    assert job.load_options() == {"dtype": torch.bfloat16, "device_map": "cpu"}
    base, _ = pipeline.load_base(job)
    assert {p.dtype for p in base.parameters()} == {torch.bfloat16}
    assert {p.device.type for p in base.parameters()} == {"cpu"}
    assert main(["run", str(path)]) == 0
    run = tmp_path / "run"
    assert yaml.safe_load((run / "job.yaml").read_text())["model"] == raw["model"]
    assert results(run, "training.json")["base_dtype"] == "torch.bfloat16"
    saved = AutoModelForMaskedLM.from_pretrained(run / "models" / "balance", dtype="auto")
    assert {p.dtype for p in saved.parameters()} == {torch.bfloat16}
    report = (run / "report.md").read_text()
    assert f"- base model: `{raw['model']['name']}`; dtype bfloat16; device_map cpu" in report
    assert "(bfloat16: 0.062 relative)" in report


@pytest.mark.parametrize("model, message", [
    ({"dtype": "fp16"}, "model.dtype is 'fp16'; allowed values: float32, bfloat16, float16, auto."),
    ({"dtype": 16}, "model.dtype: expected a string or null; got 16 (an integer)"),
    ({"dtyp": "bfloat16"}, "Unknown key 'dtyp' in model. Did you mean 'dtype'?"),
    ({"device_map": "disk"}, "model.device_map: offloading to 'disk' or 'meta' is not possible with GRADIEND"),
    ({"device_map": {"bert.encoder": "disk", "": "cpu"}}, "offloading to 'disk' or 'meta' is not possible"),
    ({"device_map": "gpu"}, "model.device_map is 'gpu': give a device (cpu, cuda, cuda:0, mps"),
    ({"device_map": {"": -1}}, "model.device_map[''] is -1: a GPU index must be 0 or more."),
    ({"device_map": "cuda:7"}, "model.device_map places modules on 'cuda:7', but this machine has"),
    ({"name": None}, "model.name: expected a string; got None"),
])
def test_bad_dtype_and_device_map_are_refused_before_any_work(tmp_path, capsys, monkeypatch, model, message):
    path = write_job(tmp_path)
    raw = yaml.safe_load(path.read_text())
    raw["model"] = {"name": raw["model"], **model}
    path.write_text(yaml.safe_dump(raw))
    no_work(monkeypatch)
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()


def test_model_options_by_set_and_a_plain_job_keeps_its_form(tmp_path):
    path = write_job(tmp_path)
    plain = read_job(str(path), [], None)
    assert isinstance(plain.to_dict()["model"], str)  # no dtype/device_map: written as before (same fingerprint)
    job = read_job(str(path), ["model.dtype=bfloat16", "model.device_map=cpu"], None)
    assert (job.model, job.model_dtype, job.model_device_map) == (plain.model, "bfloat16", "cpu")
    assert job.to_dict()["model"] == {"name": plain.model, "dtype": "bfloat16", "device_map": "cpu"}
    assert JobConfig.from_dict(job.to_dict()) == job
    with pytest.raises(JobConfigError, match="model: the mapping needs name:"):
        JobConfig.from_dict({"model": {"dtype": "bfloat16"}})


class Offloaded:
    """A from_pretrained that comes back with part of the model offloaded (what device_map='auto' does when the
    model does not fit): parameters of layer 1 on the meta device, the layer mapped to 'disk'."""

    @staticmethod
    def from_pretrained(path, **options):
        model = tiny_model("bert")
        model.bert.encoder.layer[1].to("meta")
        model.hf_device_map = {"bert.embeddings": "cpu", "bert.encoder.layer.0": "cpu", "bert.encoder.layer.1": "disk"}
        return model


def test_an_offloaded_base_is_refused_before_training(tmp_path, capsys, monkeypatch):
    path = edit_job(write_job(tmp_path), model={"name": str(tmp_path / "base"), "device_map": "auto"})
    monkeypatch.setattr(pipeline, "auto_model_class", lambda *args: Offloaded)
    trained = []
    monkeypatch.setattr(pipeline, "train", lambda *args, **kwargs: trained.append(1))
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert "model.device_map 'auto' offloaded" in err and "bert.encoder.layer.1" in err
    assert "every weight must be on a device" in err and not trained


def test_an_offloaded_parameter_alone_is_refused(tmp_path):
    model = tiny_model("bert")
    model.cls.predictions.transform.dense.to("meta")  # no device map recorded, a meta weight all the same
    job = JobConfig(model=str(tmp_path), model_device_map="auto", gradiend={"feature_classes": ["female", "male"]})
    with pytest.raises(JobConfigError, match="cls.predictions.transform.dense.weight"):
        pipeline.check_loaded(job, model)
    pipeline.check_loaded(job, tiny_model("bert"))  # a whole model passes
