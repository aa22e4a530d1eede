"""Saving a GradiendTrainer's model and pushing it to the Hub: the GRADIEND card, JSON and safetensors only.

transformers' Trainer saves `training_args.bin` (a pickle) beside the model, writes its generic fine-tuning card
("a fine-tuned version of ... on the None dataset", library_name: transformers) and uploads the whole output folder.
Here a saved model (save_model, every checkpoint) is the adapter with the GRADIEND card (cards.adapter_card: base model,
GRADIEND and user tags, datasets, training results), the tokenizer and training_args.json; an upload is one commit of
exactly those files (at the end of training also convergence.json and trainer_state.json), staged in a temporary
folder, so nothing else of the run folder (checkpoints, optimizer state, stray pickles) reaches the Hub unless
hub_strategy asks for the checkpoint, which is itself safetensors and JSON only.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional, Union

from transformers.trainer_utils import HubStrategy, SaveStrategy

from .atomic import write_text_atomically
from .checkpointing import TRAINER_STATE, pickled_files

CONVERGENCE_FILE = "convergence.json"
TRAINING_ARGS_FILE = "training_args.json"  # transformers pickles them into training_args.bin; here they are JSON
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "README.md", "auxiliary_head.safetensors",
                 "auxiliary_head_config.json")
RUN_RECORDS = (TRAINING_ARGS_FILE, CONVERGENCE_FILE, TRAINER_STATE)


def finite(value: Any) -> bool:
    """A real number, not NaN/inf (a card shows only finite figures)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def cards_list(value: Any) -> list[str]:
    """A str or a list of str (transformers' card arguments take both) as a list."""
    if value is None:
        return []
    return [value] if isinstance(value, str) else [str(v) for v in value]


class SavingAndHub:
    """GradiendTrainer's saving and Hub methods (a mixin over transformers.Trainer; `self` is the trainer)."""

    def write_model_files(self, folder: Union[str, os.PathLike], **card: Any) -> None:
        """What a saved model is, here and in every checkpoint: the adapter (adapter_config.json,
        adapter_model.safetensors) with the GRADIEND card as README.md, the tokenizer (processing_class) and the
        training arguments as training_args.json. `card`: more card fields (tags, datasets, language, license)."""
        folder = Path(folder)
        self.gradiend_model.save_pretrained(folder, **self.card_fields(**card))
        if not self.args.should_save:  # a sharded run: this process took part in gathering the adapter, nothing more
            return
        tokenizer = self.processing_class
        if tokenizer is None:
            tokenizer = getattr(self.data_collator, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(folder))
        (folder / TRAINING_ARGS_FILE).write_text(self.args.to_json_string(), encoding="utf-8")

    def card_fields(self, **extra: Any) -> dict[str, Any]:
        """The adapter card's fields from this run (cards.adapter_card): the training data, the best evaluation's
        correlation and a training-results table; `extra` adds the user's tags, datasets, language, license."""
        from .schema import count_transitions

        fields: dict[str, Any] = {}
        if self.train_dataset is not None:
            counts = ", ".join(f"{a} -> {b}: {n:,}" for (a, b), n in count_transitions(self.train_dataset).items())
            fields["training_data"] = f"{len(self.train_dataset):,} GRADIEND rows ({counts})"
        best = self.convergence.best or {}
        if finite(best.get("correlation")):
            fields["encoder_correlation"] = best["correlation"]
        results: dict[str, Any] = {"training steps": self.state.global_step}
        if best:
            results["best step"] = best.get("step")
            results.update({f"eval {key.replace('_', ' ')}": value for key, value in best.items()
                            if key != "step" and finite(value)})
        verdict = getattr(self, "verdict", None)
        if verdict is not None:
            results["converged"] = verdict["converged"]
            if verdict["reasons"]:
                results["why not converged"] = list(verdict["reasons"])
        fields["training_results"] = results
        fields.update({key: value for key, value in extra.items() if value is not None})
        return fields

    # --- the Hub: the GRADIEND card and JSON/safetensors files only, never transformers' card or a pickle -----
    def create_model_card(self, language=None, license=None, tags=None, model_name=None, finetuned_from=None,
                          tasks=None, dataset_tags=None, dataset=None, dataset_args=None) -> None:
        """The GRADIEND adapter card (cards.adapter_card) as output_dir/README.md, instead of transformers' generic
        fine-tuning card: base model, GRADIEND tags plus `tags`, `dataset`/`dataset_tags` as datasets, the training
        results. `model_name`, `finetuned_from`, `tasks` and `dataset_args` have no place in it."""
        if not self.is_world_process_zero():
            return
        from .cards import adapter_card

        datasets = [*cards_list(dataset_tags), *cards_list(dataset)]
        card = adapter_card(self.gradiend_model.saved_config(), self.gradiend_model.num_entries,
                            repo_id=self.hub_model_id,
                            **self.card_fields(tags=tags, datasets=list(dict.fromkeys(datasets)) or None,
                                               language=language, license=license))
        write_text_atomically(os.path.join(self.args.output_dir, "README.md"), str(card))

    def push_to_hub(self, commit_message: Optional[str] = "End of training", blocking: bool = True,
                    token: Optional[str] = None, revision: Optional[str] = None, private: Optional[bool] = None,
                    **kwargs: Any):
        """Save the model into output_dir and upload it as one commit: the adapter with the GRADIEND card, the
        tokenizer, training_args.json, convergence.json and trainer_state.json (nothing else of the folder: no
        checkpoints, no pickle). `kwargs` are create_model_card's (tags=, dataset=, license=, language=). The upload
        is blocking (`blocking=False` too)."""
        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        token = token if token is not None else self.args.hub_token
        if self.hub_model_id is None:
            self.init_hf_repo(token=token, private=private)
        self.save_model(_internal_call=True)
        if not self.is_world_process_zero():
            return None
        kwargs.pop("model_name", None)
        self.create_model_card(**kwargs)
        names = [*ADAPTER_FILES, *self.tokenizer_files(self.args.output_dir), *RUN_RECORDS]
        return self.upload(Path(self.args.output_dir), names, commit_message or "End of training", token=token,
                           revision=revision if revision is not None else self.args.hub_revision, private=private)

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """hub_strategy 'every_save', 'checkpoint', 'all_checkpoints': upload the checkpoint's adapter (with the card),
        tokenizer and training_args.json, and for the last two the checkpoint itself (safetensors and JSON only)
        under last-checkpoint/ or checkpoint-N/, all in one commit."""
        if not self.is_world_process_zero() or self.args.hub_strategy == HubStrategy.END:
            return
        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        checkpoint = Path(checkpoint_folder)
        names = [*ADAPTER_FILES, *self.tokenizer_files(checkpoint), TRAINING_ARGS_FILE]
        subfolder = {HubStrategy.CHECKPOINT: "last-checkpoint",
                     HubStrategy.ALL_CHECKPOINTS: checkpoint.name}.get(self.args.hub_strategy)
        if self.args.save_strategy == SaveStrategy.STEPS:
            message = f"Training in progress, step {self.state.global_step}"
        else:
            message = f"Training in progress, epoch {int(self.state.epoch or 0)}"
        self.upload(checkpoint, names, message, token=self.args.hub_token, revision=self.args.hub_revision,
                    checkpoint_as=subfolder)

    def tokenizer_files(self, folder: Path) -> list[str]:
        """The files the tokenizer wrote into `folder` (what its save_pretrained returns, by name)."""
        tokenizer = self.processing_class or getattr(self.data_collator, "tokenizer", None)
        if tokenizer is None:
            return []
        with tempfile.TemporaryDirectory(prefix="gradiend-tokenizer-") as probe:
            written = tokenizer.save_pretrained(probe)
        return sorted({Path(name).name for name in written} & {p.name for p in Path(folder).iterdir() if p.is_file()})

    def upload(self, folder: Path, names: list[str], message: str, *, token: Optional[str], revision: Optional[str],
               private: Optional[bool] = None, checkpoint_as: Optional[str] = None):
        """One commit to hub_model_id with the files `names` of `folder` that exist (and, with `checkpoint_as`, the
        checkpoint's safetensors/JSON files in that subfolder), staged in a temporary folder."""
        from .hub import upload_folder

        with tempfile.TemporaryDirectory(prefix="gradiend-push-") as tmp:
            staging = Path(tmp)
            for name in dict.fromkeys(names):
                if (folder / name).is_file():
                    shutil.copyfile(folder / name, staging / name)
            if checkpoint_as is not None:
                (staging / checkpoint_as).mkdir()
                skipped = set(pickled_files(folder))
                for entry in folder.iterdir():
                    if entry.is_file() and not entry.name.startswith(".") and entry.name not in skipped:
                        shutil.copyfile(entry, staging / checkpoint_as / entry.name)
            return upload_folder(staging, self.hub_model_id, private=private, token=token, revision=revision,
                                 commit_message=message)
