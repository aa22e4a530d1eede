"""Pushing GRADIEND adapters and models rewritten by GRADIEND to the Hugging Face Hub.

Pushing never goes through a model's own `push_to_hub`: the folder is written locally (adapter files, or the
transformers model + tokenizer) together with our card (cards.py), then uploaded with `HfApi.create_repo` +
`upload_folder`.

A folder given by the user (`gradiend-hf push`) is pushed through an allow-list (`plan_push`): only the files that
belong to an adapter or a model, regular files at the folder's top level (a symlink only if it points to a file inside
the folder). Never dotfiles (.env, .git), tokens, checkpoints, optimizer state, pickles or anything else; those are
listed as not uploaded. The allowed files are staged in a temporary folder, which is what gets uploaded.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from huggingface_hub import HfApi

from .cards import card_for_repo, merged_card
from .config import GradiendConfig, base_name

if TYPE_CHECKING:
    from huggingface_hub import CommitInfo
    from torch import nn

    from .edit import Edit


ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "README.md", "auxiliary_head.safetensors",
                 "auxiliary_head_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model",
                   "sentencepiece.bpe.model", "chat_template.jinja", "chat_template.json")
SHARD = "model-[0-9][0-9][0-9][0-9][0-9]-of-[0-9][0-9][0-9][0-9][0-9].safetensors"
MODEL_FILES = ("config.json", "generation_config.json", "README.md", "model.safetensors", SHARD,
               "model.safetensors.index.json", *TOKENIZER_FILES)
REQUIRED = {"adapter": ("adapter_config.json", "adapter_model.safetensors"), "model": ("config.json",)}


@dataclass(frozen=True)
class PushPlan:
    """What `gradiend-hf push` uploads from a folder: `files` (allowed) and `skipped` (name, why not)."""

    folder: Path
    kind: str  # "adapter" or "model"
    files: tuple[str, ...]
    skipped: tuple[tuple[str, str], ...]

    def describe(self) -> str:
        """The files to upload (with sizes) and those left out, for the output before the upload."""
        lines = [f"{self.kind} folder {self.folder}: {len(self.files)} files to upload"]
        lines += [f"  {name}  ({(self.folder / name).stat().st_size:,} bytes)" for name in self.files]
        if self.skipped:
            lines.append(f"not uploaded ({len(self.skipped)}): " + ", ".join(f"{n} ({why})" for n, why in self.skipped))
        return "\n".join(lines)


def _allowed(kind: str, name: str) -> bool:
    patterns = ADAPTER_FILES if kind == "adapter" else MODEL_FILES
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def plan_push(folder: Path, repo_id: Optional[str] = None) -> PushPlan:
    """The allow-listed files of an adapter folder (adapter_config.json) or a model folder (config.json); ValueError
    naming the problem if the folder is neither, lacks its weights, or the repo id is malformed."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if repo_id is not None:
        try:
            validate_repo_id(repo_id)
        except HFValidationError as error:
            raise ValueError(f"{repo_id!r} is not a Hub repo id ({error}); write it as user/name.") from None
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder: push runs/<run>/adapter or runs/<run>/models/<goal>.")
    kind = "adapter" if (folder / "adapter_config.json").exists() else "model" if (folder / "config.json").exists() \
        else None
    if kind is None:
        raise ValueError(f"{folder} is neither an adapter folder (adapter_config.json) nor a model folder "
                         "(config.json): push runs/<run>/adapter or runs/<run>/models/<goal>.")
    inside, files, skipped = folder.resolve(), [], []
    for entry in sorted(folder.iterdir(), key=lambda p: p.name):
        name = entry.name
        if name.startswith("."):
            skipped.append((name, "hidden"))
        elif entry.is_symlink() and not entry.resolve().is_relative_to(inside):
            skipped.append((name, "symlink out of the folder"))
        elif entry.is_dir():
            skipped.append((f"{name}/", "folder"))
        elif not entry.is_file():
            skipped.append((name, "not a regular file"))
        elif not _allowed(kind, name):
            skipped.append((name, f"not part of {'an adapter' if kind == 'adapter' else 'a model'}"))
        else:
            files.append(name)
    missing = [name for name in REQUIRED[kind] if name not in files]
    if kind == "model" and not any(fnmatch.fnmatchcase(n, "model*.safetensors") for n in files):
        missing.append("model.safetensors (or its shards)")
    if missing:
        raise ValueError(f"{folder} is {'an adapter' if kind == 'adapter' else 'a model'} folder without "
                         f"{', '.join(missing)} (as regular files inside it): nothing was uploaded.")
    return PushPlan(folder=folder, kind=kind, files=tuple(files), skipped=tuple(skipped))


def push_planned(plan: PushPlan, repo_id: str, *, private: Optional[bool], token: Optional[str],
                 revision: Optional[str], commit_message: str) -> "CommitInfo":
    """Upload exactly `plan.files`: they are linked (or copied) into a temporary folder, which is uploaded."""
    with tempfile.TemporaryDirectory(prefix="gradiend-push-") as tmp:
        for name in plan.files:
            source = (plan.folder / name).resolve()
            if name == "README.md":  # the card names this repo, not a placeholder or a local base path
                text = card_for_repo(source.read_text(encoding="utf-8"), repo_id)
                (Path(tmp) / name).write_text(text, encoding="utf-8")
                continue
            try:
                os.link(source, Path(tmp) / name)
            except OSError:  # another file system, or no hard links: copy
                shutil.copyfile(source, Path(tmp) / name)
        return upload_folder(Path(tmp), repo_id, private=private, token=token, revision=revision,
                             commit_message=commit_message)


# --- pushing -----------------------------------------------------------------------------------------------------
def upload_folder(
    folder: Path,
    repo_id: str,
    *,
    private: Optional[bool],
    token: Optional[str],
    revision: Optional[str],
    commit_message: str,
) -> "CommitInfo":
    """create_repo (exist_ok) [+ create_branch for a revision] + upload_folder: one commit with the folder's files.

    Used for adapters, merged models and `gradiend-hf push` of a run's folder (already holding its card)."""
    api = HfApi(token=token)
    api.create_repo(repo_id, token=token, private=private, repo_type="model", exist_ok=True)
    if revision is not None and revision != "main":
        api.create_branch(repo_id, branch=revision, token=token, repo_type="model", exist_ok=True)
    return api.upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        repo_type="model",
        revision=revision,
        token=token,
        commit_message=commit_message,
    )


def push_merged(
    model: "nn.Module",
    repo_id: str,
    config: GradiendConfig,
    tokenizer: Any = None,
    *,
    edit: Optional["Edit"] = None,
    private: Optional[bool] = None,
    token: Optional[str] = None,
    revision: Optional[str] = None,
    commit_message: Optional[str] = None,
    license: str = "apache-2.0",
    training_data: Optional[str] = None,
    encoder_correlation: Optional[float] = None,
) -> "CommitInfo":
    """Upload a model edited by GRADIEND (the result of `merge_and_unload`) as an ordinary transformers model.

    The repo gets the model's own `save_pretrained` files (config.json, model.safetensors, ...), the tokenizer's files
    if given, and the merged-model card as README.md. `config` is the adapter's config (`gradiend_model.gradiend_config`
    before merging); pass `edit=` when the merged edit is not the one stored in it.
    """
    from .objective import resolve_objective

    if hasattr(model, "gradiend_config"):  # a GradiendModel, not its merged result
        raise TypeError(
            "push_merged uploads an edited transformers model: call model.merge_and_unload(edit) first and push its "
            "result, or push the adapter itself with model.push_to_hub(repo_id)."
        )
    if not hasattr(model, "save_pretrained"):
        raise TypeError(f"push_merged needs a transformers model with save_pretrained, got {type(model).__name__}.")
    config = config.with_updates(
        objective=resolve_objective(model, config.objective),
        base_model_name_or_path=config.base_model_name_or_path or base_name(model),
    )
    card = merged_card(
        config,
        repo_id=repo_id,
        license=license,
        edit=edit,
        with_tokenizer=tokenizer is not None,
        training_data=training_data,
        encoder_correlation=encoder_correlation,
    )
    with tempfile.TemporaryDirectory(prefix="gradiend-push-") as tmp:
        folder = Path(tmp) / "model"
        model.save_pretrained(folder)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        card.save(folder / "README.md")  # last: ours, whatever save_pretrained wrote
        return upload_folder(
            folder,
            repo_id,
            private=private,
            token=token,
            revision=revision,
            commit_message=commit_message or "Upload model edited by GRADIEND",
        )
