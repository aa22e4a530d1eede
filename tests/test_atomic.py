"""atomic.py: an interrupted write leaves the previous file or folder as it was and no temporary files behind; a save
killed (SIGKILL, in a forked process) at any moment leaves the complete old or the complete new folder, and the next
save or load cleans up after it."""

import os
import signal
import time

import pytest

from gradiend_hf import atomic
from gradiend_hf.atomic import recover_folder, write_file_atomically, write_folder_atomically, write_text_atomically


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


# --- folders: replaced whole, at every moment a kill or an error can strike ------------------------------------------
OLD = {"adapter_model.safetensors": "weights-1", "README.md": "card-1", "adapter_config.json": "config-1"}
NEW = {"adapter_model.safetensors": "weights-2", "README.md": "card-2", "adapter_config.json": "config-2"}


def writers(files, fail_at=None):
    """Writers of `files`; the writer of file number `fail_at` (0-based) raises after writing half its file."""
    def writer(name, text, fail):
        def write(path):
            path.write_text(text[: len(text) // 2] if fail else text)
            if fail:
                raise OSError(28, "No space left on device")
        return write
    return {name: writer(name, text, i == fail_at) for i, (name, text) in enumerate(files.items())}


def contents(folder):
    """What a reader finds: {file: text} of the adapter files, or None when the folder is missing."""
    if not folder.exists():
        return None
    return {name: (folder / name).read_text() for name in NEW if (folder / name).exists()}


def prepare(folder, shared):
    """`folder` saved with OLD; `shared`: it also holds things no save writes (like a run folder's checkpoints)."""
    atomic.write_folder_atomically(folder, writers(OLD))
    if shared:
        (folder / "checkpoint-2").mkdir()
        (folder / "checkpoint-2" / "trainer_state.json").write_text("{}")
        (folder / "notes.txt").write_text("mine")


def assert_clean(folder, shared):
    """Nothing left beside or inside `folder` by a save, and what was there besides its files is still there."""
    assert os.listdir(folder.parent) == ["adapter"], os.listdir(folder.parent)
    expected = sorted(NEW) + (["checkpoint-2", "notes.txt"] if shared else [])
    assert sorted(os.listdir(folder)) == sorted(expected)
    if shared:
        assert (folder / "notes.txt").read_text() == "mine"
        assert (folder / "checkpoint-2" / "trainer_state.json").read_text() == "{}"


def renames_of_one_overwrite(tmp_path, shared):
    """How many os.replace calls overwriting a saved folder takes (the moments a kill can fall between)."""
    folder = tmp_path / f"count-{shared}" / "adapter"
    prepare(folder, shared)
    calls = []
    real = os.replace
    os.replace = lambda a, b: (calls.append(1), real(a, b))[1]
    try:
        atomic.write_folder_atomically(folder, writers(NEW))
    finally:
        os.replace = real
    assert contents(folder) == NEW
    assert_clean(folder, shared)
    return len(calls)


def failing_replace(real, n):
    count = [0]

    def replace(a, b):
        count[0] += 1
        if count[0] == n:
            raise OSError(5, "Input/output error (injected)")
        return real(a, b)
    return replace


@pytest.mark.parametrize("shared", [False, True], ids=["own folder", "shared folder"])
def test_an_overwrite_that_fails_at_any_rename_leaves_the_complete_old_folder(tmp_path, monkeypatch, shared):
    calls = renames_of_one_overwrite(tmp_path, shared)
    assert calls >= (6 if shared else 2)
    for n in range(1, calls + 1):
        folder = tmp_path / f"fail-{n}" / "adapter"
        prepare(folder, shared)
        with monkeypatch.context() as patch:
            patch.setattr(os, "replace", failing_replace(os.replace, n))
            with pytest.raises(OSError, match="injected"):
                atomic.write_folder_atomically(folder, writers(NEW))
        assert contents(folder) == OLD, n  # the failed save changed nothing, not even one file
        assert_clean(folder, shared)  # and left nothing behind
    for fail_at in range(len(NEW)):  # a writer fails (a full disk): the same
        folder = tmp_path / f"writer-{fail_at}" / "adapter"
        prepare(folder, shared)
        with pytest.raises(OSError, match="No space"):
            atomic.write_folder_atomically(folder, writers(NEW, fail_at=fail_at))
        assert contents(folder) == OLD
        assert_clean(folder, shared)


def killed_save(folder, kill):
    """Run an overwrite of `folder` with NEW in a forked process that is killed with SIGKILL at `kill`:
    ("writer", i) while writing file i, or ("before"/"after", n) around the n-th os.replace."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            real, count = os.replace, [0]

            def replace(a, b):
                count[0] += 1
                if kill == ("before", count[0]):
                    os.kill(os.getpid(), signal.SIGKILL)
                real(a, b)
                if kill == ("after", count[0]):
                    os.kill(os.getpid(), signal.SIGKILL)
            os.replace = replace
            files = writers(NEW)
            if kill[0] == "writer":
                files[list(NEW)[kill[1]]] = lambda path: (path.write_text("half"), os.kill(os.getpid(), signal.SIGKILL))
            atomic.write_folder_atomically(folder, files)
        finally:
            os._exit(3)  # not killed: the test's kill point does not exist
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (kill, status)


@pytest.mark.parametrize("shared", [False, True], ids=["own folder", "shared folder"])
def test_a_save_killed_at_any_moment_leaves_the_complete_old_or_new_folder_and_the_next_save_cleans_up(tmp_path,
                                                                                                      shared):
    calls = renames_of_one_overwrite(tmp_path, shared)
    moments = [("writer", i) for i in range(len(NEW))]
    moments += [(when, n) for n in range(1, calls + 1) for when in ("before", "after")]
    seen = set()
    for i, kill in enumerate(moments):
        folder = tmp_path / f"kill-{i}" / "adapter"
        prepare(folder, shared)
        killed_save(folder, kill)
        # a reader that does not recover: the complete old or new files, or no config (refused: "missing"), or no
        # folder (killed between the two renames of an own folder); never new weights beside an old config
        found = contents(folder)
        assert found in (OLD, NEW, None) or "adapter_config.json" not in found, (kill, found)
        recover_folder(folder)  # what a loader does before it reads
        found = contents(folder)
        assert found in (OLD, NEW), (kill, found)
        seen.add("old" if found == OLD else "new")
        assert_clean(folder, shared)  # the killed save's leftovers (80-100 MB for a real adapter) are gone
        atomic.write_folder_atomically(folder, writers(NEW))  # and a new save works
        assert contents(folder) == NEW
        assert_clean(folder, shared)
    assert seen == {"old", "new"}  # the kill points cover both sides of the swap


def test_recovering_a_folder_leaves_the_leftovers_of_its_subfolders_to_their_own_recovery(tmp_path):
    """A run folder holds checkpoint folders: recovering the run folder must not take a killed checkpoint save's
    previous folder (its only complete copy) for a leftover of its own; recovering the checkpoint puts it back."""
    run = tmp_path / "run"
    folder = run / "adapter"
    prepare(folder, shared=False)
    killed_save(folder, ("after", 1))  # killed between the two renames: no adapter, its previous version aside
    assert not folder.exists() and len(os.listdir(run)) == 2
    atomic.write_folder_atomically(run, {"adapter_config.json": lambda path: path.write_text("run-config")})
    recover_folder(run)
    assert len(os.listdir(run)) == 3  # the run's own save kept the subfolder's leftovers
    atomic.recover_folders(run)
    assert contents(folder) == OLD and sorted(os.listdir(run)) == ["adapter", "adapter_config.json"]


def test_the_next_save_deletes_what_a_killed_save_left(tmp_path):
    folder = tmp_path / "adapter"
    atomic.write_folder_atomically(folder, writers(OLD))
    killed_save(folder, ("writer", 1))  # leaves a half-written staging folder
    assert len(os.listdir(tmp_path)) == 2
    atomic.write_folder_atomically(folder, writers(NEW))
    assert os.listdir(tmp_path) == ["adapter"] and contents(folder) == NEW


def test_a_running_save_of_the_same_folder_is_not_disturbed(tmp_path):
    """Two processes save the same folder at once: the second must not delete the first one's staging folder (its
    owner is alive); both saves complete and the last one wins."""
    folder = tmp_path / "adapter"
    atomic.write_folder_atomically(folder, writers(OLD))
    third = {name: text.replace("-2", "-3") for name, text in NEW.items()}
    started, proceed = os.pipe(), os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            files = writers(third)
            first = list(third)[0]

            def slow(path):
                path.write_text(third[first])
                os.write(started[1], b"x")
                os.read(proceed[0], 1)  # wait until the parent has saved
            atomic.write_folder_atomically(folder, {**files, first: slow})
            os._exit(0)
        finally:
            os._exit(1)
    os.read(started[0], 1)
    atomic.write_folder_atomically(folder, writers(NEW))
    assert contents(folder) == NEW and len(os.listdir(tmp_path)) == 2  # the child's staging folder is still there
    os.write(proceed[1], b"x")
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    assert contents(folder) == third and os.listdir(tmp_path) == ["adapter"]


def test_saved_folders_get_the_permissions_of_a_plain_mkdir(tmp_path):
    previous = os.umask(0o027)
    try:
        atomic.write_folder_atomically(tmp_path / "adapter", writers(OLD))
        atomic.write_text_atomically(tmp_path / "results.json", "{}")
        os.mkdir(tmp_path / "plain")
        (tmp_path / "plain.json").write_text("{}")
    finally:
        os.umask(previous)
    mode = lambda p: p.stat().st_mode & 0o777  # noqa: E731
    assert mode(tmp_path / "adapter") == mode(tmp_path / "plain") == 0o750
    assert mode(tmp_path / "adapter" / "adapter_config.json") == mode(tmp_path / "plain.json") == 0o640
    assert mode(tmp_path / "results.json") == 0o640


def test_staging_folders_of_the_old_naming_are_deleted_once_old(tmp_path):
    folder = tmp_path / "adapter"
    atomic.write_folder_atomically(folder, writers(OLD))
    names = (".adapter.k3j_x9a2", ".adapter.p0q1r2s3", ".adapter.notes123")  # mkdtemp's naming of old
    stale, fresh, foreign = (tmp_path / name for name in names)
    for path in (stale, fresh, foreign):
        path.mkdir()
        (path / "adapter_model.safetensors").write_text("w")
    (foreign / "my_notes.txt").write_text("not ours")
    hours_ago = time.time() - 2 * 3600
    for path in (stale, foreign):
        os.utime(path, (hours_ago, hours_ago))
    atomic.write_folder_atomically(folder, writers(NEW))
    assert sorted(os.listdir(tmp_path)) == sorted(["adapter", fresh.name, foreign.name])


def test_a_folder_cannot_replace_a_file(tmp_path):
    (tmp_path / "adapter").write_text("a file")
    with pytest.raises(NotADirectoryError, match="is a file"):
        atomic.write_folder_atomically(tmp_path / "adapter", writers(NEW))
    assert (tmp_path / "adapter").read_text() == "a file"
