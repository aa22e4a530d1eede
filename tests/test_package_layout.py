"""The library's import surface: `import gradiend_hf` is the adapter plus the PEFT registration; training, evaluation
and the application (gradiend_hf.app: CLI, job, pipeline, report) load only when used."""

import json
import subprocess
import sys

import pytest

import gradiend_hf


def modules_after(code: str) -> set[str]:
    script = f"import sys, json\n{code}\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True).stdout
    return set(json.loads(out.strip().splitlines()[-1]))


def test_import_gradiend_hf_loads_neither_training_evaluation_nor_the_app():
    loaded = modules_after("import gradiend_hf")
    assert "gradiend_hf.peft_integration" in loaded  # PeftModel.from_pretrained works right after the import
    heavy = {"pandas", "gradiend_hf.trainer", "gradiend_hf.evaluation", "gradiend_hf.seeds"}
    assert not heavy & loaded
    assert not {m for m in loaded if m.startswith("gradiend_hf.app")}


def test_every_exported_name_resolves_to_its_defining_module():
    from gradiend_hf.evaluation import evaluate_decoder
    from gradiend_hf.trainer import GradiendTrainer

    for name in gradiend_hf.__all__:
        assert getattr(gradiend_hf, name) is not None, name
    assert gradiend_hf.GradiendTrainer is GradiendTrainer and gradiend_hf.evaluate_decoder is evaluate_decoder
    assert set(gradiend_hf.__all__) <= set(dir(gradiend_hf))
    with pytest.raises(AttributeError, match="no_such_name"):
        gradiend_hf.no_such_name
