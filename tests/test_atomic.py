"""atomic.py: an interrupted write leaves the previous file or folder as it was and no temporary files behind."""

import pytest

from gradiend_hf.atomic import write_file_atomically, write_folder_atomically, write_text_atomically


def interrupted(path):
    path.write_text("half a fil")
    raise KeyboardInterrupt("interrupted midway")


def test_a_file_is_replaced_whole_or_not_at_all(tmp_path):
    target = tmp_path / "deeper" / "results.json"
    write_text_atomically(target, "old")
    with pytest.raises(KeyboardInterrupt):
        write_file_atomically(target, interrupted)
    assert target.read_text() == "old" and sorted(p.name for p in target.parent.iterdir()) == ["results.json"]
    write_text_atomically(target, "new")
    assert target.read_text() == "new" and sorted(p.name for p in target.parent.iterdir()) == ["results.json"]


def test_a_folder_keeps_its_previous_files_when_a_write_is_interrupted(tmp_path):
    folder = tmp_path / "adapter"
    write_folder_atomically(folder, {"weights": lambda p: p.write_text("w1"), "config": lambda p: p.write_text("c1")})
    with pytest.raises(KeyboardInterrupt):
        write_folder_atomically(folder, {"weights": lambda p: p.write_text("w2"), "config": interrupted})
    assert {p.name: p.read_text() for p in folder.iterdir()} == {"weights": "w1", "config": "c1"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no staging folder left
    write_folder_atomically(folder, {"weights": lambda p: p.write_text("w2"), "config": lambda p: p.write_text("c2")})
    assert {p.name: p.read_text() for p in folder.iterdir()} == {"weights": "w2", "config": "c2"}
