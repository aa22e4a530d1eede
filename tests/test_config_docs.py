"""The configuration classes document every field they add or change (the peft/trl `Args:` convention), and the
documented defaults are the real ones."""

import doctest
import re
from dataclasses import MISSING, fields

from peft import PeftConfig
from transformers import TrainingArguments

import gradiend_hf.config
from gradiend_hf import GradiendConfig
from gradiend_hf.trainer import GradiendTrainingArguments


def default(f):
    if f.default is not MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not MISSING else MISSING


def documented(cls) -> dict[str, str]:
    """name -> the text of its `Args:` entry header, e.g. "(`int`, defaults to `1`)"."""
    return {m.group(1): m.group(2) for m in re.finditer(r"^\s{8}(\w+) \((.*?)\):?$", cls.__doc__, re.M)}


def test_every_gradiend_config_field_is_documented_with_its_real_default():
    entries = documented(GradiendConfig)
    inherited = {f.name for f in fields(PeftConfig)}
    own = [f for f in fields(GradiendConfig) if f.name not in inherited]
    assert [f.name for f in own if f.name not in entries] == []
    for f in own:
        value = default(f)
        if value is None:
            assert "*optional*" in entries[f.name] or f.name == "feature_classes", f.name
        else:
            shown = f"defaults to `{value!r}`".replace("'", '"')
            assert shown in entries[f.name] or f"`{value}`" in entries[f.name], f.name
    assert all(name in GradiendConfig.__doc__ for name in ("base_model_name_or_path", "inference_mode"))


def test_every_added_or_changed_training_argument_is_documented_with_its_real_default():
    doc = GradiendTrainingArguments.__doc__
    base = {f.name: default(f) for f in fields(TrainingArguments)}
    changed = {f.name: default(f) for f in fields(GradiendTrainingArguments) if base.get(f.name, MISSING) != default(f)}
    assert {"learning_rate", "max_grad_norm", "convergence_correlation", "optimizer_state_dtype"} <= set(changed)
    for name, value in changed.items():
        entry = re.search(rf"^\s{{8}}.*\b{name}\b.*$", doc, re.M)
        assert entry, f"{name} is not documented"
        if name in base:
            assert "transformers:" in entry.group(0) or "defaults to" in entry.group(0), name
        shown = {"per_device_train_batch_size": "4", "learning_rate": "1e-5", "max_grad_norm": "0.0"}.get(name)
        if shown:
            assert f"defaults to `{shown}`" in entry.group(0), name


def test_the_config_docstring_example_runs():
    result = doctest.testmod(gradiend_hf.config)
    assert result.attempted >= 3 and result.failed == 0
