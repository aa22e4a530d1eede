"""Fixtures shared by the test modules (tiny models and rows live in tiny.py, naive oracles in oracle.py)."""

import pytest
from fakehub import FakeHub, install_fake_hub


@pytest.fixture
def hub(tmp_path, monkeypatch) -> FakeHub:
    """The fake Hugging Face Hub (fakehub.py): pushes land in a folder under tmp_path, downloads read from it."""
    return install_fake_hub(tmp_path, monkeypatch)
