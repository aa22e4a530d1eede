"""Pushing GRADIEND adapters and models rewritten by GRADIEND to the Hugging Face Hub.

Pushing never goes through a model's own `push_to_hub`: the folder is written locally (adapter files, or the
transformers model + tokenizer) together with our card (cards.py), then uploaded with `HfApi.create_repo` +
`upload_folder`.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from huggingface_hub import HfApi

from .cards import merged_card
from .config import GradiendConfig, base_name

if TYPE_CHECKING:
    from huggingface_hub import CommitInfo
    from torch import nn

    from .edit import Edit


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
