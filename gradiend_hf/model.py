"""GradiendModel: a frozen base LM plus a parameter-shaped GRADIEND bottleneck (encode, decode, merge, save, load)."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Union

import torch
from torch import nn
from transformers.utils import ModelOutput

from .bottleneck import Bottleneck, FeatureValue
from .config import CONFIG_NAME, GradiendConfig, base_name
from .edit import Edit, InPlaceEditor, Scratch, check_finite_edit, resolve_edit
from .gradients import GradientEngine, encode_rows
from .objective import AUXILIARY_MLM, CAUSAL_LM, lm_objective, resolve_objective
from .atomic import write_folder_atomically
from .selection import parameter_dict, select_parameters
from .sharding import ShardedBottleneck, distributed_world, shard
from .serialization import WEIGHTS_NAME, adapter_key, check_fits, read_adapter, save_tensors


@dataclass
class GradiendOutput(ModelOutput):
    """The training loss (reconstruction MSE) and the encoder value h of the batch gradient."""

    loss: Optional[torch.Tensor] = None
    encoded: Optional[torch.Tensor] = None


class GradiendModel(nn.Module):
    """Wraps a masked or causal LM. The base stays frozen and in eval mode; only the bottleneck is trainable."""

    def __init__(
        self,
        base_model: nn.Module,
        config: GradiendConfig,
        parameter_names: Optional[list[str]] = None,
        indices: Optional[Mapping[str, torch.Tensor]] = None,
        auxiliary_head: Optional[nn.Module] = None,
    ) -> None:
        super().__init__()
        check_plain_base(base_model)
        check_auxiliary(base_model, config, auxiliary_head)
        self._applied: list[tuple[InPlaceEditor, Any, float]] = []  # apply_edit blocks open now, outermost first
        self._base_requires_grad = {n: p.requires_grad for n, p in base_model.named_parameters()}
        self._base_training = base_model.training
        base_model.requires_grad_(False)
        base_model.eval()
        names = parameter_names or select_parameters(base_model, config.target_parameters, config.exclude_parameters)
        self.gradiend_config = config.with_updates(
            objective=resolve_objective(base_model, config.objective),
            base_model_name_or_path=config.base_model_name_or_path or base_name(base_model),
        )
        params = parameter_dict(base_model, names)
        check_materialised(params)
        self.base_model = base_model
        # with pre_prune set, the dense bottleneck would be thrown away at training start: build a shapes-only
        # placeholder until pre-pruning builds the real one at the pruned size
        self.awaits_pre_pruning = indices is None and config.pre_prune is not None and not config.pruned_by("pre")
        # built while several processes run (torch.distributed, e.g. accelerate launch): each holds 1/N of it
        sharded = distributed_world() > 1 and not self.awaits_pre_pruning
        self.bottleneck = (ShardedBottleneck if sharded else Bottleneck)(
            {n: p.shape for n, p in params.items()},
            latent_dim=config.latent_dim,
            encoder_activation=config.encoder_activation,
            decoder_activation=config.decoder_activation,
            decoder_bias=config.decoder_bias,
            indices=indices,
            seed=config.init_seed,
            device="meta" if self.awaits_pre_pruning else {n: p.device for n, p in params.items()},
        )
        if config.encoder_bias is not None and not self.awaits_pre_pruning:
            with torch.no_grad():
                self.bottleneck.encoder_bias.copy_(torch.tensor(config.encoder_bias))
        self.auxiliary_head = auxiliary_head
        if auxiliary_head is not None:
            auxiliary_head.requires_grad_(False)  # only gradients flow through it; GRADIEND never trains or edits it
            auxiliary_head.eval()
        self.engine = GradientEngine(base_model, self.bottleneck, auxiliary_head)

    # --- state -------------------------------------------------------------------------------------------------
    def get_base_model(self) -> nn.Module:
        """The wrapped transformers model (as PeftModel.get_base_model); an error once it was handed back."""
        if "base_model" not in self._modules:
            raise RuntimeError("This GradiendModel has been unloaded or merged; its base model was handed back.")
        return self._modules["base_model"]

    def take_bottleneck(self, other: "GradiendModel") -> "GradiendModel":
        """Take `other`'s bottleneck, gradient engine and config in place (same base): pruning swaps in a smaller
        one."""
        self.bottleneck, self.engine, self.gradiend_config = other.bottleneck, other.engine, other.gradiend_config
        self.awaits_pre_pruning = other.awaits_pre_pruning
        self._selected = None
        return self

    @property
    def is_sharded(self) -> bool:
        """True when each process holds only its slice of the bottleneck (sharding.py)."""
        return isinstance(self.bottleneck, ShardedBottleneck)

    def shard(self) -> "GradiendModel":
        """Keep only this process's slice of the bottleneck (the same values; torch.distributed must run with several
        processes). GradiendTrainer does it when several processes train."""
        if not self.is_sharded:
            self.require_bottleneck()
            self._swap_bottleneck(shard(self.bottleneck))
        return self

    def unshard(self) -> "GradiendModel":
        """Assemble the whole bottleneck on every process (for DDP replicas, or to edit in one process)."""
        if self.is_sharded:
            self._swap_bottleneck(self.bottleneck.unsharded())
        return self

    def _swap_bottleneck(self, bottleneck: Bottleneck) -> None:
        self.bottleneck = bottleneck
        self.engine = GradientEngine(self.get_base_model(), bottleneck, self.auxiliary_head)

    def require_whole(self, action: str) -> None:
        """A clear error instead of an edit of one slice: edits need the whole bottleneck."""
        if self.is_sharded:
            n = self.bottleneck.world_size
            raise RuntimeError(
                f"This GradiendModel holds 1/{n} of its bottleneck on each of {n} processes (sharded training), and "
                f"{action} needs the whole one: call model.unshard() first (every process then holds all of it), or "
                "save_pretrained() and load the adapter in one process."
            )

    def require_bottleneck(self) -> None:
        """A clear error instead of meta-tensor failures while the bottleneck is a placeholder awaiting pre-pruning."""
        if self.awaits_pre_pruning:
            raise RuntimeError(
                f"This GradiendModel's config sets pre_prune={self.gradiend_config.pre_prune!r}, so its bottleneck is "
                "built at the pruned size only when pre-pruning runs: GradiendTrainer does it at the start (it needs a "
                "train_dataset), or call gradiend_hf.pruning.pre_prune(model, rows, tokenizer, keep=..., inplace=True)."
            )

    def _apply(self, fn, recurse: bool = True):
        """`.to()`/`.float()`... leave a placeholder bottleneck on the meta device (it holds no data to move)."""
        if not self.awaits_pre_pruning:
            return super()._apply(fn, recurse)
        for module in self.children():
            if module is not self.bottleneck:
                module._apply(fn)
        return self

    def keep_base_flags_of(self, other: "GradiendModel") -> "GradiendModel":
        """Restore the base's flags that `other` recorded on unload (the base was already frozen when self wrapped
        it)."""
        self._base_requires_grad = dict(other._base_requires_grad)
        self._base_training = other._base_training
        return self

    def selected_parameters(self) -> dict[str, nn.Parameter]:
        """The base parameters the adapter reads and edits, by name (looked up once: edits loop over them often)."""
        self.get_base_model()
        if getattr(self, "_selected", None) is None:
            self._selected = parameter_dict(self.get_base_model(), self.bottleneck.names)
        return self._selected

    @property
    def hf_device_map(self) -> dict:
        """The base's device map (from `from_pretrained(device_map=...)`): the Trainer then leaves the model where it
        is instead of moving it to one device. Absent (AttributeError) when the base has none, as on a plain model:
        accelerate and the Trainer test `hasattr`."""
        device_map = getattr(self._modules.get("base_model"), "hf_device_map", None)
        if device_map is None:
            raise AttributeError("hf_device_map")
        return device_map

    @property
    def config(self):
        """The base model's transformers config (as on a PeftModel); the adapter's own is `gradiend_config`."""
        return getattr(self._modules.get("base_model"), "config", None)

    @property
    def objective(self) -> str:
        return self.gradiend_config.objective

    @property
    def lm_objective(self) -> str:
        """The objective of the base's own LM head, used by evaluation, LMS and rewriting ('causal_lm' for the
        auxiliary objective, whose head only shapes the gradients)."""
        return lm_objective(self.gradiend_config.objective)

    @property
    def num_entries(self) -> int:
        return self.bottleneck.num_entries

    def train(self, mode: bool = True) -> "GradiendModel":
        """Only the bottleneck trains; the base never leaves eval mode (no dropout in its gradients)."""
        super().train(mode)
        if "base_model" in self._modules:
            self._modules["base_model"].eval()
        if self.auxiliary_head is not None:
            self.auxiliary_head.eval()
        return self

    def print_trainable_parameters(self) -> None:
        trainable = sum(p.numel() for p in self.bottleneck.parameters())
        total = sum(p.numel() for p in self.get_base_model().parameters())
        print(
            f"GRADIEND reads/edits {self.num_entries:,} of {total:,} base weights "
            f"({100 * self.num_entries / total:.2f}%) in {len(self.bottleneck.names)} tensors; "
            f"trainable params: {trainable:,}"
        )

    # --- gradients and the auto-encoder -------------------------------------------------------------------------
    def gradients(self, batch: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(source, target) gradients of one collated batch, in bottleneck coordinates (engine buffers)."""
        source, target = self.gradiend_config.source, self.gradiend_config.target
        grads = self.engine.compute(batch, tuple(dict.fromkeys((source, target))))
        return grads[source], grads[target]

    def forward(self, **batch: torch.Tensor) -> GradiendOutput:
        """Training step body: gather the batch's gradients, encode the source, reconstruct the target (MSE)."""
        self.require_bottleneck()
        source, target = self.gradients(batch)
        encoded = self.bottleneck.encode(source)
        if not torch.isfinite(encoded).all():
            raise FloatingPointError(
                "The encoder value is not finite: the gathered gradients contain NaN/inf (or the bottleneck diverged; "
                "lower the learning rate)."
            )
        loss = self.bottleneck.reconstruction_loss(encoded, target)
        return GradiendOutput(loss=loss, encoded=encoded.detach())

    @torch.no_grad()
    def encode(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """h of the batch gradient (one value per latent unit)."""
        self.require_bottleneck()
        source, _ = self.gradients(batch)
        return self.bottleneck.encode(source)

    @torch.no_grad()
    def encode_rows(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """h of every row's own gradient (rows x latent), by forward-mode AD instead of a backward per row."""
        self.require_bottleneck()
        return encode_rows(self.engine, batch, self.gradiend_config.source)

    @torch.no_grad()
    def decode(self, h: FeatureValue) -> dict[str, torch.Tensor]:
        """The decoder's parameter-shaped update for a feature value h."""
        self.require_bottleneck()
        self.require_whole("an edit")
        return {n: self.bottleneck.to_full(n, v) for n, v in self.bottleneck.decode(h).items()}

    # --- editing -------------------------------------------------------------------------------------------------
    def editor(self) -> InPlaceEditor:
        """An editor for trying many edits in a row (decoder grids): apply(ff, lr) ... restore()."""
        self.require_bottleneck()
        self.require_whole("an edit")
        return InPlaceEditor(self.bottleneck, self.selected_parameters())

    def record_edit(self, edit: Edit) -> None:
        """Store an edit (and its evaluation figures) in the config: `merge_and_unload()` without arguments, the saved
        adapter, its model card and PEFT loading then use it."""
        ff = edit.feature_factor if isinstance(edit.feature_factor, (int, float)) else list(edit.feature_factor)
        self.gradiend_config = self.gradiend_config.with_updates(
            feature_factor=ff,
            learning_rate=edit.learning_rate,
            evaluation=dict(edit.metrics) or self.gradiend_config.evaluation,
        )

    def edit_values(self, edit: Optional[Edit], feature_factor: Optional[FeatureValue],
                    learning_rate: Optional[float]) -> tuple[Any, float]:
        """(feature_factor, learning_rate) from an Edit, the keywords, or the edit stored in the config."""
        stored = (self.gradiend_config.feature_factor, self.gradiend_config.learning_rate)
        return resolve_edit(edit, feature_factor, learning_rate, stored)

    @contextlib.contextmanager
    def apply_edit(
        self,
        edit: Optional[Edit] = None,
        *,
        feature_factor: Optional[FeatureValue] = None,
        learning_rate: Optional[float] = None,
    ):
        """Context manager: the base model carries the edit inside the block and is restored bit-exactly after."""
        self.require_bottleneck()
        self.require_whole("an edit")
        ff, lr = self.edit_values(edit, feature_factor, learning_rate)
        editor = InPlaceEditor(self.bottleneck, self.selected_parameters())
        try:
            editor.apply(ff, lr)
            self._applied.append((editor, ff, lr))
            yield self
        finally:
            if self._applied and self._applied[-1][0] is editor:
                self._applied.pop()
            editor.restore()

    @contextlib.contextmanager
    def disable_adapter(self):
        """PEFT's `disable_adapter()`: inside the block the base model runs as it was, without the edits that
        `apply_edit` blocks have applied (restored bit-exactly, re-applied after). Outside `apply_edit` the base never
        carries an edit (only `merge_and_unload` writes one for good), so the block then changes nothing."""
        active = list(self._applied)
        for editor, _, _ in reversed(active):
            editor.restore()
        try:
            yield self
        finally:
            for editor, ff, lr in active:
                editor.apply(ff, lr)

    @torch.no_grad()
    def merge_and_unload(
        self,
        edit: Optional[Edit] = None,
        *,
        feature_factor: Optional[FeatureValue] = None,
        learning_rate: Optional[float] = None,
    ) -> nn.Module:
        """Apply theta += lr * dec(ff) to the selected parameters in place and return the plain base model.

        Without arguments, the edit stored in the config (feature_factor, learning_rate) is applied. The adapter lets
        go of the base model; the result loads anywhere with `from_pretrained` once saved.
        """
        self.require_bottleneck()
        self.require_whole("an edit")
        ff, lr = self.edit_values(edit, feature_factor, learning_rate)
        scratch = Scratch()
        check_finite_edit(self.bottleneck, self.selected_parameters(), ff, lr, scratch)
        self.record_edit(edit if edit is not None else Edit(feature_factor=ff, learning_rate=lr))
        for name, p in self.selected_parameters().items():
            current = self.bottleneck.entries(name, p.detach())
            self.bottleneck.write_entries(
                name, p, current, self.bottleneck.edit_delta(name, ff, lr, out=scratch.like(current))
            )
        return self.unload()

    def unload(self) -> nn.Module:
        """Hand back the base model as it is (untouched unless merged), with its original training flags."""
        base = self.get_base_model()
        del self._modules["base_model"]
        self.engine = None
        self._selected = None
        for name, p in base.named_parameters():
            p.requires_grad_(self._base_requires_grad.get(name, True))
        base.train(self._base_training)
        return base

    # --- save / load ---------------------------------------------------------------------------------------------
    def adapter_state(self) -> dict[str, torch.Tensor]:
        """The adapter tensors keyed in PEFT's layout (see serialization.py)."""
        self.require_bottleneck()
        if self.is_sharded:  # its tensors are this process's slices, not the adapter's tensors
            self.require_whole("adapter_state() (the whole adapter tensors)")
        b = self.bottleneck
        tensors = {}
        for name in b.names:
            tensors[adapter_key(name, "encoder")] = b.encoder(name)
            tensors[adapter_key(name, "decoder")] = b.decoder(name)
            if b.has_decoder_bias:
                tensors[adapter_key(name, "offset")] = b.offset(name)
            if b.indices[name] is not None:
                tensors[adapter_key(name, "index")] = b.indices[name]
        return tensors

    def saved_config(self) -> GradiendConfig:
        return self.gradiend_config.with_updates(
            encoder_bias=[float(v) for v in self.bottleneck.encoder_bias.detach().cpu()],
            parameters=list(self.bottleneck.names),
            kept_entries={n: int(i.numel()) for n in self.bottleneck.names
                          if (i := self.bottleneck.selected_indices(n)) is not None} or None,
            # PEFT's convention for a config without task_type: AutoPeftModel* rebuild the base from this class
            auto_mapping=self.auto_mapping(),
        )

    def auto_mapping(self) -> Optional[dict[str, str]]:
        """{"base_model_class", "parent_library"} of the base (what PEFT writes when saving), so that
        `AutoPeftModel.from_pretrained(adapter_dir)` and `AutoPeftModelForCausalLM` can load the base it names."""
        if "base_model" not in self._modules:
            return self.gradiend_config.auto_mapping
        cls = type(self.get_base_model())
        return {"base_model_class": cls.__name__, "parent_library": cls.__module__}

    def save_pretrained(self, save_directory: Union[str, os.PathLike], is_main_process: bool = True,
                        **card_fields: Any) -> None:
        """adapter_config.json + adapter_model.safetensors + README.md, written atomically.

        Several processes (transformers' and PEFT's `is_main_process`): call it on every process; only the main one
        writes. A sharded model is saved by every process together (the tensors stream to process 0 one parameter at a
        time, sharded_io), whatever `is_main_process` says."""
        from .cards import adapter_card

        self.require_bottleneck()
        if not (is_main_process or self.is_sharded):
            return
        config = self.saved_config()
        head = self.auxiliary_head
        files = {} if head is None else {name: (lambda path: None) for name in AUXILIARY_FILES}
        if head is not None:  # both head files are written by one call; the second entry only moves it into place
            files[AUXILIARY_FILES[0]] = lambda path: head.write_files(path.parent)
        files["README.md"] = lambda path: adapter_card(config, self.num_entries, **card_fields).save(path)
        files[CONFIG_NAME] = lambda path: path.write_text(config.to_json_string(), encoding="utf-8")
        if self.is_sharded:
            from .sharded_io import save_sharded_pretrained

            return save_sharded_pretrained(self, save_directory, files)
        tensors = self.adapter_state()
        write_folder_atomically(save_directory, {WEIGHTS_NAME: lambda path: save_tensors(tensors, path), **files})

    @classmethod
    def from_pretrained(
        cls,
        base_model: nn.Module,
        path_or_repo_id: Union[str, os.PathLike],
        revision: Optional[str] = None,
        auxiliary_head: Optional[nn.Module] = None,
        **hub_kwargs: Any,
    ) -> "GradiendModel":
        """Load an adapter (local folder or Hub repo) onto `base_model`, checking that it was made for it.

        An adapter trained with objective='auxiliary_mlm' also loads its auxiliary head from a local folder (or pass
        `auxiliary_head=`); the head is only needed for gradients and encodings, not for merging."""
        check_plain_base(base_model)
        config, grouped = read_adapter(path_or_repo_id, revision=revision, **hub_kwargs)
        check_fits(base_model, config, grouped)
        indices = {n: t["index"] for n, t in grouped.items() if "index" in t}
        order = [n for n, _ in base_model.named_parameters() if n in grouped]  # files sort keys; sums need model order
        if config.objective == AUXILIARY_MLM and auxiliary_head is None:
            from .aux_head import AuxiliaryMaskedHead

            auxiliary_head = AuxiliaryMaskedHead.from_pretrained(path_or_repo_id)
            auxiliary_head.to(base_model.get_input_embeddings().weight.device)
        model = cls(base_model, config, parameter_names=order, indices=indices, auxiliary_head=auxiliary_head)
        model.bottleneck_from(grouped)
        return model

    def load_adapter_weights(self, path: Union[str, os.PathLike]) -> None:
        """Load the trained tensors of a saved adapter (e.g. a checkpoint) into this model's bottleneck."""
        self.require_bottleneck()
        config, grouped = read_adapter(path)
        if set(grouped) != set(self.bottleneck.names):
            raise ValueError(
                f"The adapter at {path} covers other parameters than this model; it belongs to another run."
            )
        check_fits(self.get_base_model(), config, grouped)
        for name, tensors in grouped.items():
            mine, saved = self.bottleneck.selected_indices(name), tensors.get("index")
            if (mine is None) != (saved is None) or (mine is not None and not torch.equal(mine.cpu(), saved.cpu())):
                raise ValueError(
                    f"The adapter at {path} keeps other entries of {name} than this model (pruning differs)."
                )
        self.bottleneck_from(grouped)
        with torch.no_grad():
            self.bottleneck.encoder_bias.copy_(torch.tensor(config.encoder_bias))

    @torch.no_grad()
    def bottleneck_from(self, grouped: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        b = self.bottleneck
        for name, tensors in grouped.items():
            for kind in ("encoder", "decoder", "offset")[: 3 if b.has_decoder_bias else 2]:
                b.set_whole(name, kind, tensors[kind])

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: Optional[bool] = None,
        token: Optional[str] = None,
        revision: Optional[str] = None,
        commit_message: Optional[str] = None,
        **card_fields: Any,
    ):
        """Upload this adapter (adapter_config.json, adapter_model.safetensors, README.md card) to a Hub repo.

        The files are exactly those of `save_pretrained`; `card_fields` go to `cards.adapter_card` (training_data=,
        encoder_correlation=, license=). `revision` names the branch to commit to (created if missing). Load it back
        with `GradiendModel.from_pretrained(base, repo_id, revision=...)`.
        """
        import tempfile
        from pathlib import Path

        from .hub import upload_folder

        card_fields.setdefault("repo_id", repo_id)
        first, second = self.gradiend_config.feature_classes
        with tempfile.TemporaryDirectory(prefix="gradiend-push-") as tmp:
            folder = Path(tmp) / "adapter"
            self.save_pretrained(folder, **card_fields)
            return upload_folder(folder, repo_id, private=private, token=token, revision=revision,
                                 commit_message=commit_message or f"Upload GRADIEND adapter ({first} vs {second})")


AUXILIARY_FILES = ("auxiliary_head.safetensors", "auxiliary_head_config.json")  # = aux_head.HEAD_*_NAME


def check_materialised(params: Mapping[str, torch.Tensor]) -> None:
    """Offloaded parameters (device_map with 'disk'/'cpu' offload, or meta placeholders) hold no data on their module:
    their gradients cannot be gathered and their weights cannot be edited in place."""
    offloaded = [name for name, p in params.items() if p.is_meta]
    if offloaded:
        raise ValueError(
            f"{len(offloaded)} selected base parameter(s) are offloaded or not materialised (on the meta device), e.g. "
            f"{offloaded[:2]}. GRADIEND reads their gradients and edits them in place: load the base without "
            "offloading (a device_map that fits it on your devices, or none), or leave those parameters out with "
            "GradiendConfig(exclude_parameters=[...])."
        )


def check_plain_base(base_model: nn.Module) -> None:
    """GRADIEND reads and edits a plain transformers model's own weights; PEFT layers (LoRA, a loaded GRADIEND
    adapter ...) would rename and shadow them."""
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTunerLayer

    wrapped = isinstance(base_model, PeftModel) or any(isinstance(m, BaseTunerLayer) for m in base_model.modules())
    if wrapped:
        raise ValueError(
            f"The base model ({type(base_model).__name__}) holds PEFT adapter layers; GradiendModel wraps a plain "
            "transformers model. Merge the adapter into the weights first (base = peft_model.merge_and_unload()) to "
            "keep its change, or drop it (base = peft_model.unload())."
        )


def check_auxiliary(base_model: nn.Module, config: GradiendConfig, head: Optional[nn.Module]) -> None:
    """The auxiliary objective needs a causal base and a head for its class pair; other objectives take no head."""
    if config.objective != AUXILIARY_MLM:
        if head is not None:
            raise ValueError(
                f"An auxiliary_head was given, but the config's objective is {config.objective!r}; set "
                "GradiendConfig(objective='auxiliary_mlm') to take gradients through it."
            )
        return
    if resolve_objective(base_model) != CAUSAL_LM:
        raise ValueError(
            f"objective='auxiliary_mlm' is for causal LMs; {type(base_model).__name__} is a masked LM, which sees the "
            "right context already: use objective='masked_lm'."
        )
    if head is None:
        raise ValueError(
            "objective='auxiliary_mlm' needs an auxiliary head: head = gradiend_hf.aux_head.train_auxiliary_head(base, "
            "tokenizer, train_rows, feature_classes), then get_gradiend_model(base, config, auxiliary_head=head)."
        )
    from .aux_head import check_head_fits

    check_head_fits(base_model, head, config.feature_classes)


def get_gradiend_model(
    base_model: nn.Module, config: GradiendConfig, auxiliary_head: Optional[nn.Module] = None
) -> GradiendModel:
    """Wrap a transformers masked or causal LM with a fresh GRADIEND bottleneck (PEFT's get_peft_model analogue).

    auxiliary_head: for GradiendConfig(objective='auxiliary_mlm'), the trained head (gradiend_hf.aux_head)."""
    return GradiendModel(base_model, config, auxiliary_head=auxiliary_head)
