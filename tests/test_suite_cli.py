"""`gradiend-hf run` of a job with pairs: (a suite) on a tiny model: the run folder, the tables and the report, and bad
pairs refused before anything is written."""

import json

import pandas as pd
import pytest
import yaml
from test_cli import write_job
from test_suite import three_class_rows
from test_trainer import CONTEXTS

from gradiend_hf.app.cli import main
from gradiend_hf.app.job import JobConfig, JobConfigError


def suite_job(tmp_path, pairs, **changes):
    """write_job's tiny model and files, with three-class row files and `pairs:` instead of feature_classes."""
    path = write_job(tmp_path)
    job = yaml.safe_load(path.read_text())
    for split, contexts in (("train", CONTEXTS[:5]), ("validation", CONTEXTS[5:]), ("test", CONTEXTS[4:])):
        pd.DataFrame(three_class_rows(contexts)).to_json(job["data"][split], orient="records", lines=True)
    del job["gradiend"]
    del job["evaluation"]["neutral_contexts"]
    job.update(pairs=pairs, **changes)
    path.write_text(yaml.safe_dump(job))
    return path


@pytest.mark.parametrize("pairs, message", [
    ([["female", "asian"]], r"pairs: The pair \['female', 'asian'\] names \['asian'\], not a class of the data; the "
                            r"data's classes are \['female', 'male', 'group'\]"),
    ([["male", "male"]], "names the same class twice"),
    ([["female", "male"], ["male", "female"]], "given twice"),
])
def test_bad_pairs_fail_before_anything_is_written(tmp_path, capsys, pairs, message):
    job = suite_job(tmp_path, pairs)
    assert main(["run", str(job)]) == 2
    assert not (tmp_path / "run").exists()
    import re

    assert re.search(message, capsys.readouterr().err)


def test_a_suite_job_names_its_classes_once_and_runs_only_as_a_whole(tmp_path, capsys):
    job = suite_job(tmp_path, [["female", "male"]])
    raw = yaml.safe_load(job.read_text())
    with pytest.raises(JobConfigError, match="leave gradiend.feature_classes out"):
        JobConfig.from_dict({**raw, "gradiend": {"feature_classes": ["female", "male"]}})
    with pytest.raises(JobConfigError, match="other_classes is 'keep'; allowed values: identity, drop"):
        JobConfig.from_dict({**raw, "other_classes": "keep"})
    assert main(["train", str(job)]) == 2 and "runs with `gradiend-hf run JOB`" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    # a job without pairs is written (and fingerprinted) as before the suite fields existed
    plain = JobConfig.from_file(write_job(tmp_path / "plain")).to_dict()
    assert "pairs" not in plain and "other_classes" not in plain
    assert JobConfig.from_file(job).to_dict()["pairs"] == [["female", "male"]]


def test_run_of_a_suite_writes_every_pair_the_comparison_tables_and_the_report(tmp_path, capsys):
    job = suite_job(tmp_path, [["male", "group"], ["female", "group"]], seeds=[0])
    assert main(["run", str(job)]) == 0
    run = tmp_path / "run"
    assert f"report: {run / 'report.md'}" in capsys.readouterr().out
    for name in ("training/suite.json", "training/male-group/best/adapter_config.json",
                 "training/female-group/seed_report.json", "results/cross_encoding.csv",
                 "results/cross_encoding_means.csv", "results/decoder_overlap.csv", "results/decoder_cosine.csv",
                 "results/decoder_layers.csv", "results/edit_probabilities.csv", "plots/cross_encoding.png",
                 "plots/decoder_overlap.png", "plots/decoder_layers.png", "plots/edit_probabilities.png"):
        assert (run / name).is_file(), name
    record = json.loads((run / "results" / "suite.json").read_text())
    assert [p["label"] for p in record["pairs"]] == ["male-group", "female-group"]
    assert record["rows"]["test"] == {"female": 8, "male": 8, "group": 8}
    for entry in record["pairs"]:
        if entry["converged"]:  # evaluated like a single run into results/<pair>/
            assert (run / "results" / entry["folder"] / "evaluation.json").is_file()
            assert set(entry["edits"]) == {"balance", *entry["pair"]}
    assert any(p["converged"] for p in record["pairs"])
    cross = record["cross_encoding"]["correlation"]
    assert set(cross) == {"male-group", "female-group"} and set(cross["male-group"]) == set(cross)
    report = (run / "report.md").read_text()
    assert report.startswith("# GRADIEND suite: female, male, group (2 pairs)")
    for section in ("## Rows per class", "## Pairs", "## Encoders on each other's rows", "## Decoders",
                    "## Each pair's edits on every class"):
        assert section in report
    assert main(["report", str(run)]) == 0 and (run / "report.md").read_text() == report
    # --resume of the finished suite trains and evaluates nothing again and rewrites the same tables
    evaluated = {p: p.stat().st_mtime_ns for p in (run / "results").glob("*/evaluation.json")}
    assert evaluated
    assert main(["run", str(job), "--resume"]) == 0
    again = json.loads((run / "results" / "suite.json").read_text())
    assert again["cross_encoding"] == record["cross_encoding"] and again["pairs"] == record["pairs"]
    assert {p: p.stat().st_mtime_ns for p in evaluated} == evaluated
    assert {"training", "training (resumed)", "total", "total (resumed)"} <= set(
        json.loads((run / "results" / "timings.json").read_text()))


def test_pairs_are_checked_against_a_recipes_classes_before_any_text_is_read(tmp_path, capsys):
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"model": "smollm2", "output_dir": str(tmp_path / "run"),
                                   "data": {"recipe": "religion", "text": "wikipedia"},
                                   "pairs": [["christian", "hindu"]]}))
    assert main(["run", str(job)]) == 2
    assert "the data's classes are ['christian', 'jewish', 'muslim']" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_pair_without_rows_of_a_class_in_a_split_is_refused_before_training(tmp_path, capsys, monkeypatch):
    from gradiend_hf.app import suite_pipeline

    job = suite_job(tmp_path, [["female", "group"]])
    test_file = yaml.safe_load(job.read_text())["data"]["test"]
    rows = [r for r in three_class_rows(CONTEXTS[4:]) if r["factual_class"] != "group"]
    pd.DataFrame(rows).to_json(test_file, orient="records", lines=True)
    monkeypatch.setattr(suite_pipeline, "load_base", lambda job: pytest.fail("the model was loaded"))
    assert main(["run", str(job)]) == 2
    assert "pairs: ['female', 'group'] has no test rows of ['group'] (the test split has {'female': 8, 'male': 8})" \
        in capsys.readouterr().err


def test_the_shipped_suite_example_is_a_valid_suite_job():
    from pathlib import Path

    job = JobConfig.from_file(Path(__file__).resolve().parents[1] / "examples" / "configs" /
                              "suite_religion_smollm2.yaml")
    assert job.pairs == [["christian", "jewish"], ["christian", "muslim"], ["jewish", "muslim"]]
    assert job.pair_job(job.pairs[1]).adapter_config().feature_classes == ["christian", "muslim"]
