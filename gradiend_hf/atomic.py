"""Atomic writes: a reader sees the old file (or folder) or the new one, never half of one, even after a kill -9.

Every file gradiend_hf writes goes through here: adapters and checkpoints (a folder of files), run results and
reports, the data-creation cache (single files).

A file is written under a temporary name beside its target and renamed onto it (one atomic rename). A folder cannot
be replaced by one rename, so a save writes the complete new folder first and then swaps it in by renaming folders:

    1. write   .<name>.staging-<owner>/     every file of the new folder
    2. rename  <name>  ->  .<name>.old-<owner>                  (only when <name> exists)
    3. rename  .<name>.staging-<owner>  ->  <name>
    4. delete  .<name>.old-<owner>

A save killed between 2 and 3 leaves no <name>, but the complete previous folder under `.old`: `recover_folder` puts
it back (every save calls it first, and loaders call it before they read). Other kills leave a staging folder (before
3) or an `.old` folder (before 4) beside a complete <name>; the next save or recovery of the same name deletes them.

A folder that also holds things this save does not write (an adapter saved into a training run's output folder, beside
its checkpoints) is not replaced, since that would delete them. Its files are swapped one by one instead, in an order
that never shows a mix: first the files named `last` (the config readers check first) are renamed to backups
`<name>/.<file>.backup-<owner>`, then the other old files; then the new files are renamed in, the `last` ones last, and
the backups deleted. Until the end the folder lacks its config, so a loader refuses it with a clear error instead of
reading new weights beside an old config; `recover_folder` puts the backups back if the save died before its last file
was in place, and deletes them otherwise.

`<owner>` names the host, process id and process start time of the save, so that the leftovers of a save that is
still running (another process writing the same folder) are never touched, and a reused process id is not mistaken
for the save that died. New folders get the permissions of a plain mkdir (the umask applies), not mkdtemp's 0700.
A symlink to a folder is followed (the folder it points to is saved). Two processes saving the same folder at once
leave the complete folder of one of them when it holds only their files; into a shared folder, do not save at once.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import secrets
import shutil
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence, Union

PathLike = Union[str, os.PathLike]
logger = logging.getLogger("gradiend_hf")

# How long a reader waits for a live save that is between steps 2 and 3 (a few microseconds normally) before it puts
# the previous folder back itself (the save then fails with an error instead of replacing the restored folder).
SWAP_WAIT_SECONDS = 5.0
# Staging folders of the mkdtemp naming used before (".<name>.<8 random characters>") carry no owner; they are
# deleted once they are this old, which no save takes.
LEGACY_STAGING_AGE_SECONDS = 3600.0

_LEFTOVER = re.compile(
    r"^\.(?P<name>.+)\.(?P<kind>staging|old|backup)-"
    r"(?P<owner>(?P<host>[0-9a-f]{6})-(?P<pid>\d+)-(?P<start>\d+)-[0-9a-f]{8})$"
)
_LEGACY = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}$")
_SAVED_SUFFIXES = (".json", ".safetensors", ".md")  # what an adapter or checkpoint folder holds
_ACTIVE: set[str] = set()  # owners of this process's saves in progress
_ACTIVE_LOCK = threading.Lock()


# --- single files ------------------------------------------------------------------------------------------------
def write_file_atomically(path: PathLike, write: Callable[[Path], None]) -> None:
    """`write(tmp)` a temporary file beside `path`, then rename it onto `path` (atomic on one file system).

    `write` creates the file itself, so it gets the permissions of any new file (the umask applies)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
    try:
        write(tmp)
        _fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)


def write_text_atomically(path: PathLike, text: str) -> None:
    write_file_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


# --- folders -------------------------------------------------------------------------------------------------------
def write_folder_atomically(directory: PathLike, writers: dict[str, Callable[[Path], None]]) -> None:
    """Save the files `writer(path)` writes as the folder `directory`, atomically (see `staged_folder`); the last
    writer's file is the one readers check first (the config).

    A folder holding only files of earlier saves is replaced as a whole (files `writers` no longer names are gone);
    in a folder that also holds other things, those stay."""
    with staged_folder(directory, last=list(writers)[-1:]) as staging:
        for filename, write in writers.items():
            write(staging / filename)


@contextmanager
def staged_folder(directory: PathLike, last: Sequence[str] = ()) -> Iterator[Path]:
    """Yield an empty staging folder beside `directory`; when the block ends without an error, what it holds becomes
    `directory` (steps 2-4 above, or file by file with `last` moved in last when `directory` holds other things too).
    On an error the staging folder is deleted and `directory` stays as it was."""
    directory = _target(directory)
    if os.path.lexists(directory) and not directory.is_dir():
        raise NotADirectoryError(
            f"{directory} is a file, but a folder is saved there; delete or move the file, or save elsewhere."
        )
    directory.parent.mkdir(parents=True, exist_ok=True)
    recover_folder(directory)
    owner = _new_owner()
    staging = directory.parent / f".{directory.name}.staging-{owner}"
    old = directory.parent / f".{directory.name}.old-{owner}"
    with _ACTIVE_LOCK:
        _ACTIVE.add(owner)
    finished = False
    try:
        os.mkdir(staging)  # mode 0o777 minus the umask, like any folder the user makes
        yield staging
        _fsync_tree(staging)
        if _only_saved_files(directory, staging):
            if os.path.lexists(directory):
                os.replace(directory, old)
            os.replace(staging, directory)
        else:
            _swap_files(staging, directory, owner, last)
        finished = True
        _fsync_dir(directory.parent)
        _fsync_dir(directory)
    finally:  # also on KeyboardInterrupt between two renames: put the previous folder (or files) back
        with _ACTIVE_LOCK:
            _ACTIVE.discard(owner)
        if os.path.lexists(old) and not os.path.lexists(directory):
            os.replace(old, directory)
        _settle_backups(directory, owner, restore=not finished and _holds_files(staging))
        for leftover in (staging, old):
            if os.path.lexists(leftover):
                shutil.rmtree(leftover, ignore_errors=True)


def _only_saved_files(directory: Path, staging: Path) -> bool:
    """True when `directory` is missing or holds nothing but files this save writes too: it can be replaced whole."""
    if not os.path.lexists(directory):
        return True
    new = set(os.listdir(staging))
    return all(entry.name in new and entry.is_file(follow_symlinks=False) for entry in os.scandir(directory))


def _swap_files(staging: Path, directory: Path, owner: str, last: Sequence[str]) -> None:
    """Move the new files into a folder that holds other things too (see the module docstring)."""
    names = sorted(os.listdir(staging))
    order = [name for name in names if name not in last] + [name for name in last if name in names]
    for name in reversed(order):  # the config first: from here on the folder reads as incomplete
        if os.path.lexists(directory / name):
            os.replace(directory / name, directory / f".{name}.backup-{owner}")
    moved = []
    try:
        for name in order:
            os.replace(staging / name, directory / name)
            moved.append(name)
    except BaseException:  # new files that no backup will replace: remove them (the backups go back in `finally`)
        for name in moved:
            if not os.path.lexists(directory / f".{name}.backup-{owner}"):
                _remove(directory / name)
        raise


def _settle_backups(directory: Path, owner: str, restore: bool) -> None:
    """Put back (`restore`) or delete the backups `_swap_files` made in `directory` for the save `owner`."""
    suffix = f".backup-{owner}"
    try:
        backups = [entry for entry in os.scandir(directory) if entry.name.startswith(".")
                   and entry.name.endswith(suffix)]
    except (FileNotFoundError, NotADirectoryError):
        return
    for entry in backups:
        if not restore:
            _remove(Path(entry.path))
            continue
        original = directory / entry.name[1: -len(suffix)]
        if os.path.isdir(original) and not os.path.islink(original):
            shutil.rmtree(original)
        os.replace(entry.path, original)


def _holds_files(folder: Path) -> bool:
    try:
        return any(True for _ in os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return False


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


# --- recovery of interrupted saves ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Leftover:
    path: Path
    kind: str  # "staging" or "old" (beside the folder), "backup" (in it)
    owner: str
    host: str
    pid: int
    start: int


def recover_folder(directory: PathLike, wait: float = SWAP_WAIT_SECONDS) -> None:
    """Undo what killed saves of `directory` left behind: put the previous folder back if a save died while swapping
    (the interrupted save is discarded), and delete its staging and `.old` folders. Call it before reading a local
    folder that gradiend_hf saves; it costs one listing of the parent folder and does nothing when all is well.

    Leftovers of a save that is still running are left alone; if such a save seems stuck between its two renames
    for `wait` seconds, the previous folder is put back anyway (that save then fails with an error)."""
    directory = _target(directory)
    leftovers, legacy = _scan(directory)
    try:
        if not os.path.lexists(directory):
            _restore_previous(directory, [item for item in leftovers if item.kind == "old"], wait)
        _recover_files(directory)
    except OSError as error:  # e.g. a read-only copy: report, and let the reader meet the folder as it is
        logger.warning("Could not repair %s after an interrupted save: %s. Repair it where it can be written (e.g. "
                       "by saving it again, or gradiend_hf.atomic.recover_folder).", directory, error)
        return
    for item in leftovers:
        if os.path.lexists(item.path) and _owner_gone(item):
            logger.info("Deleting %s, left by an interrupted save of %s.", item.path.name, directory)
            shutil.rmtree(item.path, ignore_errors=True)
    for path in legacy:
        logger.info("Deleting %s, a staging folder left by an interrupted save of %s.", path.name, directory)
        shutil.rmtree(path, ignore_errors=True)


def recover_folders(parent: PathLike) -> None:
    """`recover_folder` for every folder in `parent` that interrupted saves left something beside (e.g. all
    checkpoints of a run)."""
    parent = _absolute(parent)
    if not parent.is_dir():
        return
    names = {match["name"] for entry in os.scandir(parent)
             if (match := _LEFTOVER.match(entry.name)) and match["kind"] != "backup"}
    for name in sorted(names):
        recover_folder(parent / name)


def _recover_files(directory: Path) -> None:
    """Backups of file-by-file saves (`_swap_files`) whose save died: put back when it died before its last file was
    in place (its staging folder still holds files), deleted when it finished."""
    try:
        entries = [entry.name for entry in os.scandir(directory) if entry.name.startswith(".")]
    except (FileNotFoundError, NotADirectoryError):
        return
    owners = {}
    for name in entries:
        match = _LEFTOVER.match(name)
        if match and match["kind"] == "backup":
            owners[match["owner"]] = _Leftover(directory / name, "backup", match["owner"], match["host"],
                                               int(match["pid"]), int(match["start"]))
    for owner, item in owners.items():
        if _owner_gone(item):
            staging = directory.parent / f".{directory.name}.staging-{owner}"
            unfinished = _holds_files(staging)
            _settle_backups(directory, owner, restore=unfinished)
            if unfinished:
                logger.warning("Restored the previous files of %s: a save into it was interrupted (and is discarded).",
                               directory)


def _scan(directory: Path) -> tuple[list[_Leftover], list[Path]]:
    """This folder's leftovers of interrupted saves, and legacy staging folders old enough to be dead."""
    prefix = f".{directory.name}."
    leftovers, legacy = [], []
    try:
        entries = [entry for entry in os.scandir(directory.parent) if entry.name.startswith(prefix)]
    except FileNotFoundError:
        return [], []
    for entry in entries:
        match = _LEFTOVER.match(entry.name)
        if match and match["name"] == directory.name and match["kind"] != "backup":
            leftovers.append(_Leftover(Path(entry.path), match["kind"], match["owner"], match["host"],
                                       int(match["pid"]), int(match["start"])))
            continue
        legacy_match = _LEGACY.match(entry.name)
        if legacy_match and legacy_match["name"] == directory.name and _legacy_staging(entry):
            legacy.append(Path(entry.path))
    return leftovers, legacy


def _legacy_staging(entry: os.DirEntry) -> bool:
    """A staging folder of the old naming: a folder, untouched for long, holding only files a save writes."""
    if not entry.is_dir(follow_symlinks=False):
        return False
    if time.time() - entry.stat(follow_symlinks=False).st_mtime < LEGACY_STAGING_AGE_SECONDS:
        return False
    inside = list(os.scandir(entry.path))
    return all(item.is_file(follow_symlinks=False) and item.name.endswith(_SAVED_SUFFIXES) for item in inside)


def _restore_previous(directory: Path, olds: list[_Leftover], wait: float) -> None:
    if not olds:
        return
    deadline = time.monotonic() + wait
    while not os.path.lexists(directory) and not all(_owner_gone(item) for item in olds):
        if time.monotonic() >= deadline:
            break
        time.sleep(0.02)  # a live save is between its two renames: let it finish
    if os.path.lexists(directory):
        return
    present = [item for item in olds if os.path.lexists(item.path)]
    if not present:
        return
    newest = max(present, key=lambda item: item.path.lstat().st_ctime)
    try:
        os.replace(newest.path, directory)
    except OSError:
        if not os.path.lexists(directory):  # nobody else restored or saved it meanwhile
            raise
        return
    logger.warning(
        "%s was missing after an interrupted save; restored the previous version from %s (the interrupted save is "
        "discarded).", directory, newest.path.name,
    )


# --- owners: which save wrote a leftover, and is it still running ------------------------------------------------
def _host() -> str:
    return hashlib.sha1(socket.gethostname().encode("utf-8")).hexdigest()[:6]


def _start_time(pid: int) -> Optional[int]:
    """Start time of process `pid` in centiseconds (0 when it cannot be told), or None when there is no such
    process. With the pid it identifies a process even when pids are reused (e.g. in containers)."""
    try:
        import psutil
    except ImportError:
        return _pid_exists_without_psutil(pid)
    try:
        return int(round(psutil.Process(pid).create_time() * 100))
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None
    except psutil.Error:
        return 0


def _pid_exists_without_psutil(pid: int) -> Optional[int]:
    if os.name != "posix":
        return 0  # cannot tell: treat as running
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return 0


def _new_owner() -> str:
    pid = os.getpid()
    return f"{_host()}-{pid}-{_start_time(pid) or 0}-{secrets.token_hex(4)}"


def _owner_gone(item: _Leftover) -> bool:
    """True only when the save that made `item` has certainly ended (another host's saves cannot be checked)."""
    if item.host != _host():
        return False
    if item.pid == os.getpid():
        with _ACTIVE_LOCK:
            return item.owner not in _ACTIVE
    started = _start_time(item.pid)
    if started is None:
        return True
    return bool(started and item.start and abs(started - item.start) > 1)  # the pid now belongs to another process


# --- helpers -----------------------------------------------------------------------------------------------------
def _absolute(path: PathLike) -> Path:
    return Path(os.path.abspath(os.fspath(path)))


def _target(path: PathLike) -> Path:
    """The folder a save writes: `path` made absolute, or the folder it points to when it is a symlink."""
    path = _absolute(path)
    return Path(os.path.realpath(path)) if os.path.islink(path) else path


def _fsync_file(path: Path) -> None:
    """Flush a written file to the disk before it is renamed into place, so that a power cut cannot leave a renamed
    but empty file (a kill alone never needs this)."""
    if not path.is_file():
        return
    handle = os.open(path, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def _fsync_dir(path: Path) -> None:
    if os.name != "posix":
        return
    try:
        handle = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass  # some file systems cannot sync a folder; the files themselves are synced
    finally:
        os.close(handle)


def _fsync_tree(root: Path) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            _fsync_file(Path(folder) / name)
        _fsync_dir(Path(folder))
