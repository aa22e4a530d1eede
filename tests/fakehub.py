"""A recorder standing in for the Hugging Face Hub (no network here): pushes land in a folder, downloads read from it.

`HfApi.create_repo` / `create_branch` / `upload_folder` (what our pushes call) and `huggingface_hub.hf_hub_download`
(what loading a repo id calls) are replaced. Files live in `<fake hub>/<user>/<repo>/<revision>/`; a new branch starts
from main, as on the Hub. Any other Hub call fails the test.
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import huggingface_hub
from huggingface_hub import HfApi
from huggingface_hub.errors import EntryNotFoundError
from huggingface_hub.hf_api import CommitInfo


@dataclass
class FakeHub:
    root: Path
    cache: Path
    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    uploads: list[dict[str, Any]] = field(default_factory=list)

    def folder(self, repo_id: str, revision: Optional[str] = None) -> Path:
        return self.root / repo_id / (revision or "main")

    def names(self, name: str) -> list[dict[str, Any]]:
        return [kwargs for call, kwargs in self.calls if call == name]


def install_fake_hub(tmp_path: Path, monkeypatch) -> FakeHub:
    """Replace the Hub calls (see the module docstring) for one test; the `hub` fixture of conftest.py calls this."""
    fake = FakeHub(root=tmp_path / "fake-hub", cache=tmp_path / "hf-cache")

    def create_repo(self, repo_id, **kwargs):
        fake.calls.append(("create_repo", dict(repo_id=repo_id, **kwargs)))
        if fake.folder(repo_id).exists() and not kwargs.get("exist_ok"):
            raise AssertionError("create_repo without exist_ok on an existing repo fails on the Hub")
        fake.folder(repo_id).mkdir(parents=True, exist_ok=True)
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_branch(self, repo_id, *, branch, **kwargs):
        fake.calls.append(("create_branch", dict(repo_id=repo_id, branch=branch, **kwargs)))
        assert fake.folder(repo_id).exists(), "branch of a repo that was never created"
        if not fake.folder(repo_id, branch).exists():
            shutil.copytree(fake.folder(repo_id), fake.folder(repo_id, branch))

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        fake.calls.append(("upload_folder", dict(repo_id=repo_id, folder_path=folder_path, **kwargs)))
        target = fake.folder(repo_id, kwargs.get("revision"))
        assert target.exists(), f"upload to {repo_id}@{kwargs.get('revision')}, which does not exist on the fake hub"
        files = {p.relative_to(folder_path).as_posix(): p.read_bytes()
                 for p in Path(folder_path).rglob("*") if p.is_file()}
        for name, content in files.items():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            (target / name).write_bytes(content)
        fake.uploads.append(dict(repo_id=repo_id, revision=kwargs.get("revision"), files=files))
        oid = hashlib.sha1(b"".join(files[n] for n in sorted(files))).hexdigest()
        return CommitInfo(
            commit_url=f"https://huggingface.co/{repo_id}/commit/{oid}",
            commit_message=kwargs.get("commit_message") or "",
            commit_description="",
            oid=oid,
        )

    def refuse(self, *args, **kwargs):
        raise AssertionError("an unrecorded Hub call was made")

    def hf_hub_download(repo_id, filename, *, revision=None, cache_dir=None, **kwargs):
        fake.calls.append(("hf_hub_download", dict(repo_id=repo_id, filename=filename, revision=revision,
                                                   cache_dir=cache_dir, **kwargs)))
        source = fake.folder(repo_id, revision) / filename
        if not source.is_file():
            raise EntryNotFoundError(f"{filename} not found in {repo_id}@{revision or 'main'}")
        snapshot = (Path(cache_dir or fake.cache) / f"models--{repo_id.replace('/', '--')}" / "snapshots"
                    / (revision or "main"))
        snapshot.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, snapshot / filename)
        return str(snapshot / filename)

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_branch", create_branch)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    for name in ("create_commit", "upload_file"):
        monkeypatch.setattr(HfApi, name, refuse)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    monkeypatch.setattr(huggingface_hub.file_download, "hf_hub_download", hf_hub_download)
    return fake
