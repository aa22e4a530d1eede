"""Sharded state to and from disk: checkpoints of a sharded bottleneck and its AdamW state, and adapter exports.

Checkpoints (save_sharded_checkpoint / load_sharded_checkpoint) go through torch.distributed.checkpoint (DCP): every
local slice is described as a DTensor (Shard on its last dimension, over a 1-D device mesh of the ranks; encoder_bias
and the AdamW step counters Replicate), so each rank writes only its slice and a load fills the local slices in place,
also on another number of ranks (DCP reads the overlapping parts of the saved slices). DCP's default FileSystemWriter
pickles its metadata file (`.metadata`, read back with pickle.load); the checkpoints here use DCP's HuggingFace
storage instead (hf_storage.HuggingFaceStorageWriter/Reader with save_distributed=True): one safetensors file per rank
whose header records each slice's offsets, and whose reader rebuilds the metadata from those headers, so loading reads
safetensors and JSON only. The hyperparameters of the optimizer's groups and what identifies the bottleneck (world
size, selected entries) go to a JSON file beside them. The stochastic-rounding generators of
bfloat16 AdamW moments (fused.AdamWSteps) differ between the ranks (each has drawn for its own slices): they are kept
per rank (one JSON file each) and restored on the same number of ranks (not on another). b_e's moments are kept per
rank too (row `rank` of a (world_size, latent_dim) tensor); AdamWSteps rounds them with a generator all ranks share, so
they are equal, and a save refuses if b_e is not.

Adapter export (save_sharded_pretrained, what GradiendModel.save_pretrained does for a sharded model) writes the same
folder as the one-process save, without ever holding the whole bottleneck in one place: the tensors are gathered to
rank 0 one parameter at a time and streamed into adapter_model.safetensors, whose header is written first (every shape
and dtype is known up front).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import struct
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
import torch.distributed as dist

from .atomic import staged_folder, write_folder_atomically, write_text_atomically
from .checkpointing import from_json, jsonable
from .fused import AdamWSteps
from .serialization import WEIGHTS_NAME, adapter_key
from .sharding import ShardedBottleneck

ShardedModel = torch.nn.Module  # a GradiendModel whose bottleneck is sharded (model.py imports this module)

__all__ = ["save_sharded_checkpoint", "load_sharded_checkpoint", "read_checkpoint_record", "save_sharded_pretrained",
           "stream_adapter_tensors", "safetensors_header"]
PathLike = Union[str, os.PathLike]
logger = logging.getLogger("gradiend_hf")
CHECKPOINT_JSON = "sharded_checkpoint.json"
CHECKPOINT_FORMAT = 1
MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
                      torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8"}


# --- what is saved -------------------------------------------------------------------------------------------------
def _sharded(model) -> ShardedBottleneck:
    bottleneck = getattr(model, "bottleneck", None)
    if not isinstance(bottleneck, ShardedBottleneck):
        raise TypeError("This needs a GradiendModel whose bottleneck is sharded (built while torch.distributed runs "
                        "with several processes, or model.shard()); save a one-process model with save_pretrained.")
    return bottleneck


def _tensors(b: ShardedBottleneck) -> list[tuple[str, Optional[str], torch.nn.Parameter]]:
    """(label, base parameter name or None for b_e, tensor) of every bottleneck tensor, in the model's order."""
    found: list[tuple[str, Optional[str], torch.nn.Parameter]] = [("encoder_bias", None, b.encoder_bias)]
    for name in b.names:
        found.append((f"encoder.{name}", name, b.encoder(name)))
        found.append((f"decoder.{name}", name, b.decoder(name)))
        if b.has_decoder_bias:
            found.append((f"offset.{name}", name, b.offset(name)))
    return found


def _mesh(b: ShardedBottleneck):
    """The 1-D device mesh of the bottleneck's ranks (on the device type its tensors live on)."""
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

    device_type = b.encoder_bias.device.type
    if b.group is None:
        return init_device_mesh(device_type, (b.world_size,))
    return DeviceMesh.from_group(b.group, device_type)


def _as_dtensor(b: ShardedBottleneck, mesh, name: Optional[str], local: torch.Tensor):
    """A local slice as the DTensor it is a part of: Shard on its last dimension (the selected entries of `name`,
    laid out as shards.shard_bounds), or Replicate when `name` is None (b_e, step counters)."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    local = local.detach()
    if name is None:
        return DTensor.from_local(local, mesh, [Replicate()], run_check=False, shape=local.shape,
                                  stride=local.stride())
    shape = (*local.shape[:-1], b.global_counts[name])
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(local, mesh, [Shard(local.dim() - 1)], run_check=False, shape=torch.Size(shape),
                              stride=stride)


def _selection(b: ShardedBottleneck) -> dict[str, Any]:
    """What a checkpoint's slices are slices of: each parameter's entry count and a digest of its kept indices."""
    kept = {}
    for name in b.names:
        idx = b.global_indices[name]
        kept[name] = {"count": b.global_counts[name], "shape": list(b.shapes[name]),
                      "indices_sha256": None if idx is None else hashlib.sha256(
                          idx.detach().cpu().to(torch.int64).contiguous().numpy().tobytes()).hexdigest()}
    return {"latent_dim": b.latent_dim, "decoder_bias": b.has_decoder_bias, "parameters": kept}


def _labels(b: ShardedBottleneck, optimizer: torch.optim.Optimizer) -> dict[int, str]:
    """id(parameter) -> label for every parameter of the optimizer (all must be bottleneck tensors)."""
    labels = {id(t): label for label, _, t in _tensors(b)}
    strangers = [p for group in optimizer.param_groups for p in group["params"] if id(p) not in labels]
    if strangers:
        raise ValueError(f"The optimizer holds {len(strangers)} tensor(s) that are not this model's bottleneck "
                         "tensors; a sharded checkpoint saves an optimizer over model.bottleneck.parameters() only.")
    return labels


def _agree(b: ShardedBottleneck, values: list[float], what: str) -> None:
    """Raise unless every rank holds the same `values` (replicated numbers are saved by one rank only)."""
    if not values:
        return
    mine = torch.tensor(values, dtype=torch.float64, device=b.encoder_bias.device)
    both = torch.cat([mine, -mine])
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=b.group)
    if not torch.equal(both[: len(values)], -both[len(values):]):
        raise RuntimeError(f"The ranks hold different {what}; a replicated value is saved once, so it must be equal "
                           "on every rank. Nothing was saved.")


def _broadcast_text(b: ShardedBottleneck, text: Optional[str]) -> str:
    """Rank 0's `text` on every rank."""
    box = [text]
    dist.broadcast_object_list(box, src=dist.get_global_rank(b.group, 0) if b.group is not None else 0, group=b.group)
    return box[0]


def _flag(b: ShardedBottleneck, value: int) -> int:
    """Rank 0's `value` on every rank (the others pass anything): whether rank 0 got on or failed."""
    flag = torch.tensor([value], dtype=torch.int64, device=b.encoder_bias.device)
    dist.broadcast(flag, src=dist.get_global_rank(b.group, 0) if b.group is not None else 0, group=b.group)
    return int(flag[0])


# --- checkpoints -----------------------------------------------------------------------------------------------------
def _per_rank(label: str, key: str) -> bool:
    """True for the AdamW moments of b_e: replicated in value but not in bits once they are kept in bfloat16 (each
    rank's rounding generator has drawn for slices of its own sizes), so each rank's own copy is saved."""
    return label == "encoder_bias" and key in MOMENTS


def _checkpoint_state(b: ShardedBottleneck, optimizer: Optional[torch.optim.Optimizer], mesh) -> dict[str, Any]:
    """The DCP state dict: each bottleneck tensor and each AdamW state tensor as a DTensor over the local slice (b_e's
    moments as row `rank` of a (world_size, latent_dim) tensor: _per_rank)."""
    from torch.distributed.tensor import DTensor, Shard

    state: dict[str, Any] = {}
    for label, name, tensor in _tensors(b):
        state[f"bottleneck.{label}"] = _as_dtensor(b, mesh, name, tensor)
        if optimizer is None:
            continue
        for key, value in optimizer.state.get(tensor, {}).items():
            if not torch.is_tensor(value):
                raise TypeError(f"The optimizer state {key!r} of {label} is not a tensor; a sharded checkpoint saves "
                                "torch.optim.AdamW's state (exp_avg, exp_avg_sq, step).")
            if _per_rank(label, key):
                row = value.detach().unsqueeze(0)
                state[f"optimizer.{label}.{key}"] = DTensor.from_local(
                    row, mesh, [Shard(0)], run_check=False, shape=torch.Size((b.world_size, *value.shape)),
                    stride=torch.empty((b.world_size, *value.shape), device="meta").stride())
                continue
            replicated = key not in MOMENTS
            state[f"optimizer.{label}.{key}"] = _as_dtensor(b, mesh, None if replicated else name, value)
    return state


def save_sharded_checkpoint(model: ShardedModel, optimizer: Optional[torch.optim.Optimizer], folder: PathLike,
                            steps: Optional[AdamWSteps] = None) -> None:
    """Save a sharded bottleneck and its optimizer's per-slice AdamW state into `folder` (called on every rank; each
    rank writes only its slices, into one safetensors file of its own). The folder appears atomically once every rank
    has written; `load_sharded_checkpoint` resumes from it exactly, on this or another number of ranks. With `steps`
    (AdamWSteps keeping bfloat16 moments) each rank also saves its rounding generators, without which a resumed run
    rounds differently."""
    from torch.distributed.checkpoint import save
    from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageWriter

    b = _sharded(model)
    labels = _labels(b, optimizer) if optimizer is not None else {}
    held = [optimizer.state.get(t, {}) for _, _, t in _tensors(b)] if optimizer is not None else []
    counters = [float(v) for entries in held for k, v in entries.items() if k not in MOMENTS]
    _agree(b, counters, "AdamW step counters")
    _agree(b, [float(v) for v in b.encoder_bias.detach().cpu()], "encoder biases b_e (with bfloat16 AdamW moments "
           "b_e's moments are rounded with each rank's own random bits, so b_e can drift apart between the ranks)")
    record = {"format": CHECKPOINT_FORMAT, "world_size": b.world_size, **_selection(b),
              "optimizer": None if optimizer is None else {"param_groups": [
                  {**{k: jsonable(v) for k, v in group.items() if k != "params"},
                   "params": [labels[id(p)] for p in group["params"]]} for group in optimizer.param_groups]}}
    state = _checkpoint_state(b, optimizer, _mesh(b))
    if b.rank != 0:
        staging = _broadcast_text(b, None)
        if not staging:
            raise RuntimeError(f"Rank 0 could not start the sharded checkpoint {folder}; see its error.")
        try:  # (DCP's save ends with a collective: rank 0 goes on only once every rank has written its files)
            problem = _save_generators(b, steps, Path(staging))
            save(state, storage_writer=HuggingFaceStorageWriter(staging, save_distributed=True),
                 process_group=b.group)
            if problem is not None:
                raise problem
        finally:  # wait until rank 0 has moved the complete folder into place
            finished = _flag(b, 0)
        if not finished:
            raise RuntimeError(f"Rank 0 could not finish the sharded checkpoint {folder}; see its error.")
        return
    announced, finished = False, False
    try:
        with contextlib.ExitStack() as stack:
            try:
                staging = stack.enter_context(staged_folder(folder, last=[CHECKPOINT_JSON]))
            except BaseException:
                _broadcast_text(b, "")
                raise
            _broadcast_text(b, str(staging))
            announced = True
            problem = _save_generators(b, steps, staging)
            save(state, storage_writer=HuggingFaceStorageWriter(str(staging), save_distributed=True),
                 process_group=b.group)
            if problem is not None:
                raise problem
            write_text_atomically(staging / CHECKPOINT_JSON, json.dumps(record, indent=1))
        finished = True
    finally:
        if announced:
            _flag(b, int(finished))


def read_checkpoint_record(folder: PathLike) -> dict[str, Any]:
    """The JSON record of a sharded checkpoint (world size, selection, optimizer hyperparameters)."""
    path = Path(folder) / CHECKPOINT_JSON
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: {folder} is not a sharded checkpoint (save_sharded_checkpoint "
                                "writes it last, so an interrupted save has none).")
    return json.loads(path.read_text(encoding="utf-8"))


def _check_selection(b: ShardedBottleneck, record: dict[str, Any], folder: PathLike) -> None:
    mine = _selection(b)
    if record.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{folder} is a sharded checkpoint of format {record.get('format')!r}; this version reads "
                         f"format {CHECKPOINT_FORMAT}.")
    for key in ("latent_dim", "decoder_bias"):
        if record[key] != mine[key]:
            raise ValueError(f"The checkpoint {folder} has {key}={record[key]!r}, this model {mine[key]!r}: it "
                             "belongs to another adapter.")
    if record["parameters"] != mine["parameters"]:
        saved, have = record["parameters"], mine["parameters"]
        differ = sorted(n for n in set(saved) | set(have) if saved.get(n) != have.get(n))
        raise ValueError(f"The checkpoint {folder} covers other base parameters or other kept entries than this model "
                         f"({differ[:3]}{' ...' if len(differ) > 3 else ''}): it belongs to another run or pruning.")


def _prepare_optimizer(b: ShardedBottleneck, optimizer: torch.optim.Optimizer, record: dict[str, Any],
                       saved: dict[str, Any], folder: PathLike) -> None:
    """Give the optimizer the saved hyperparameters and state tensors of the saved dtypes (created as AdamW creates
    them when it has none yet), for the load to fill in place."""
    groups = (record.get("optimizer") or {}).get("param_groups")
    if groups is None:
        raise ValueError(f"The checkpoint {folder} holds no optimizer state (it was saved with optimizer=None).")
    labels = _labels(b, optimizer)
    if [[labels[id(p)] for p in g["params"]] for g in optimizer.param_groups] != [g["params"] for g in groups]:
        raise ValueError(f"The optimizer's parameter groups differ from those saved in {folder}; build it as the "
                         "saved run did (torch.optim.AdamW over model.bottleneck.parameters()).")
    for group, stored in zip(optimizer.param_groups, groups):
        group.update({k: from_json(v) for k, v in stored.items() if k != "params"})
    for label, _, tensor in _tensors(b):
        if id(tensor) not in {id(p) for g in optimizer.param_groups for p in g["params"]}:
            continue
        prefix = f"optimizer.{label}."
        keys = {k[len(prefix):]: meta for k, meta in saved.items() if k.startswith(prefix)}
        state = optimizer.state[tensor]
        for key, meta in keys.items():
            dtype = meta.properties.dtype
            current = state.get(key)
            if current is None or current.dtype != dtype or current.shape != (tensor.shape if key in MOMENTS else ()):
                state[key] = (torch.zeros_like(tensor, dtype=dtype) if key in MOMENTS
                              else torch.zeros((), dtype=dtype, device=tensor.device))
        for key in [k for k in state if k not in keys]:
            del state[key]


def load_sharded_checkpoint(model: ShardedModel, optimizer: Optional[torch.optim.Optimizer], folder: PathLike,
                            steps: Optional[AdamWSteps] = None) -> None:
    """Fill this rank's bottleneck slices (and the optimizer's per-slice AdamW state, and its groups' hyperparameters)
    in place from a checkpoint of save_sharded_checkpoint, saved on any number of ranks. Reads safetensors and JSON
    only. With `steps`, its rounding generators are restored when the checkpoint was saved with them on as many
    ranks as now (on another number of ranks no rank's generator is the continuation of a saved one: they stay)."""
    from torch.distributed.checkpoint import load
    from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageReader

    b = _sharded(model)
    record = read_checkpoint_record(folder)
    _check_selection(b, record, folder)
    reader = HuggingFaceStorageReader(str(folder))
    saved = reader.read_metadata().state_dict_metadata
    if optimizer is not None:
        _prepare_optimizer(b, optimizer, record, saved, folder)
    state = _checkpoint_state(b, optimizer, _mesh(b))
    rows = {}  # b_e's moments: every saved rank's copy is read, and this rank's (or rank 0's) kept
    for key in [k for k in state if k.startswith("optimizer.encoder_bias.") and _per_rank("encoder_bias",
                                                                                         k.rsplit(".", 1)[1])]:
        rows[key] = state[key].to_local()[0]
        state[key] = torch.empty(tuple(saved[key].size), dtype=saved[key].properties.dtype,
                                 device=rows[key].device) if key in saved else state[key]
    missing = sorted(k for k in state if k not in saved)
    if missing:
        raise ValueError(f"The checkpoint {folder} lacks {missing[:3]}{' ...' if len(missing) > 3 else ''}: it is "
                         f"incomplete (saved by {record['world_size']} ranks; a rank's file may be missing).")
    for key, value in state.items():
        meta = saved[key]
        if tuple(meta.size) != tuple(value.shape):
            raise ValueError(f"{key} has shape {tuple(meta.size)} in {folder}, {tuple(value.shape)} here: the "
                             "checkpoint belongs to another adapter, or a rank's file is missing.")
        if sum(torch.Size(chunk.sizes).numel() for chunk in meta.chunks) != torch.Size(meta.size).numel():
            raise ValueError(f"The files of {folder} hold only part of {key}: a rank's file is missing or damaged "
                             f"(it was saved by {record['world_size']} ranks, one file each).")
    load(state, storage_reader=HuggingFaceStorageReader(str(folder)), process_group=b.group)
    same_world = record["world_size"] == b.world_size
    with torch.no_grad():
        for key, target in rows.items():  # another number of ranks: every rank starts from rank 0's copy
            target.copy_(state[key][b.rank if same_world else 0])
    if steps is not None and record["world_size"] == b.world_size:
        _load_generators(b, steps, Path(folder))
    elif steps is not None:
        logger.warning("The checkpoint %s was saved by %d ranks and is loaded by %d: the bfloat16 moments' rounding "
                       "generators start afresh, so the resumed run rounds differently than an uninterrupted one.",
                       folder, record["world_size"], b.world_size)


REPLICATED = "replicated:"  # the key prefix of a generator for tensors every rank holds whole (b_e)


def _generators_file(b: ShardedBottleneck) -> str:
    return f"rounding-generators-{b.rank:05d}-of-{b.world_size:05d}.json"


def _save_generators(b: ShardedBottleneck, steps: Optional[AdamWSteps], folder: Path) -> Optional[Exception]:
    """Write this rank's AdamWSteps rounding generators (per device) as JSON beside its tensors. Returns the error
    instead of raising it, so that the rank still takes part in DCP's save (the others would wait for it)."""
    if steps is None:
        return None
    try:
        states = {f"{kind}{device}": generator.get_state().cpu().numpy().tobytes().hex()
                  for kind, generators in (("", steps.generators), (REPLICATED, steps.replicated_generators))
                  for device, generator in generators.items()}
        write_text_atomically(folder / _generators_file(b), json.dumps({"seed": steps.seed, "generators": states}))
    except Exception as error:
        return error
    return None


def _load_generators(b: ShardedBottleneck, steps: AdamWSteps, folder: Path) -> None:
    path = folder / _generators_file(b)
    if not path.is_file():
        return  # saved without `steps`: nothing to restore
    saved = json.loads(path.read_text(encoding="utf-8"))
    for device, state in saved["generators"].items():
        raw = torch.frombuffer(bytearray(bytes.fromhex(state)), dtype=torch.uint8)
        replicated = device.startswith(REPLICATED)
        steps.generator_for(torch.device(device.removeprefix(REPLICATED)), replicated).set_state(raw)


# --- adapter export --------------------------------------------------------------------------------------------------
def _adapter_plan(b: ShardedBottleneck) -> list[tuple[str, Optional[str], str, torch.dtype, tuple[int, ...]]]:
    """(file key, base parameter name, kind, dtype, shape) of every tensor of the one-process adapter file, in the
    order GradiendModel.adapter_state lists them."""
    plan = []
    for name in b.names:
        idx = b.global_indices[name]
        entries = tuple(b.shapes[name]) if idx is None else (int(idx.numel()),)
        plan.append((adapter_key(name, "encoder"), name, "encoder", b.encoder(name).dtype, (b.latent_dim, *entries)))
        plan.append((adapter_key(name, "decoder"), name, "decoder", b.decoder(name).dtype, (b.latent_dim, *entries)))
        if b.has_decoder_bias:
            plan.append((adapter_key(name, "offset"), name, "offset", b.offset(name).dtype, entries))
        if idx is not None:
            plan.append((adapter_key(name, "index"), name, "index", torch.int64, entries))
    return plan


def safetensors_header(plan: list[tuple[str, torch.dtype, tuple[int, ...]]],
                       metadata: Optional[dict[str, str]] = None) -> bytes:
    """The first bytes of a safetensors file holding tensors (key, dtype, shape) in this order: the 8-byte
    little-endian length of the JSON header, and the header (padded with spaces to a multiple of 8)."""
    header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for key, dtype, shape in plan:
        if dtype not in SAFETENSORS_DTYPES:
            raise TypeError(f"{key} is {dtype}, which this writer cannot store; save the adapter as float32.")
        size = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
        header[key] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                       "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def stream_adapter_tensors(model: ShardedModel, path: Optional[Path]) -> None:
    """Called on every rank: gather each adapter tensor to rank 0 in turn and append its bytes to the safetensors file
    `path` (rank 0; None elsewhere). A write error on rank 0 is raised only after the last gather, so that the other
    ranks never wait for a gather that does not come."""
    b = _sharded(model)
    if sys.byteorder != "little":
        raise RuntimeError("safetensors stores little-endian bytes; this writer runs on little-endian machines only.")
    plan = _adapter_plan(b)
    header = safetensors_header([(key, dtype, shape) for key, _, _, dtype, shape in plan])  # (raises on every rank)
    handle, error = None, None
    if b.rank == 0:
        try:
            handle = open(path, "wb")
            handle.write(header)
        except Exception as caught:
            error = caught
    try:
        for key, name, kind, dtype, shape in plan:
            if kind == "index":
                whole = b.global_indices[name] if b.rank == 0 else None
            else:
                whole = b.gather(name, kind, dst=0)
            if whole is None or error is not None:
                continue
            try:
                data = whole.detach().to("cpu", dtype).contiguous().reshape(shape)
                handle.write(data.reshape(-1).view(torch.uint8).numpy().tobytes())
            except Exception as caught:
                error = caught
            del whole
    finally:
        if handle is not None:
            handle.close()
    if error is not None:
        raise error


def save_sharded_pretrained(model: ShardedModel, save_directory: PathLike,
                            files: dict[str, Callable[[Path], Any]]) -> None:
    """GradiendModel.save_pretrained of a sharded model (called on every rank; `files`: the writers of the folder's
    other files, as the one-process save has them): the folder the one-process save of the whole bottleneck writes,
    written by rank 0 atomically; the other ranks take part in the gathers and return once rank 0 has finished (or
    raise when it failed)."""
    b = _sharded(model)
    safetensors_header([(key, dtype, shape) for key, _, _, dtype, shape in _adapter_plan(b)])  # dtypes it can store
    if b.rank != 0:
        if not _flag(b, 0):
            raise RuntimeError(f"Rank 0 could not start saving the adapter to {save_directory}; see its error.")
        try:
            stream_adapter_tensors(model, None)
        finally:  # wait until rank 0 has moved the complete folder into place (or failed)
            finished = _flag(b, 0)
        if not finished:
            raise RuntimeError(f"Rank 0 could not finish saving the adapter to {save_directory}; see its error.")
        return

    def weights(path: Path) -> None:
        _flag(b, 1)
        stream_adapter_tensors(model, path)

    # the weights first: the gathers start before rank 0 does anything that could fail on its own
    writers = {WEIGHTS_NAME: weights, **files}
    try:
        write_folder_atomically(save_directory, writers)
    except BaseException:
        _flag(b, 0)  # not started: the others stop at the start flag; started: they wait at the final one
        raise
    _flag(b, 1)
