"""One process of the sharded save/load cases of tests/test_sharded_io.py (torch.distributed.run, gloo).

--mode save (2 processes): for each case, train two sharded steps, then
  * export: save_pretrained of the sharded model (streamed to rank 0), and the one-process save_pretrained of the
    unsharded bottleneck beside it (rank 0) for the test to compare;
  * from_pretrained of the export on every rank: each rank's slices must be the slices of the saved tensors;
  * exact resume: save_sharded_checkpoint, two more steps, load_sharded_checkpoint (pickle.load and torch.load are
    made to fail meanwhile), the slices must equal the saved ones bit for bit, and the same two steps again must end
    bit-identical to the uninterrupted run. The checkpoint is kept, with the whole tensors it holds (for --mode load).
--mode load (3 processes): load the checkpoints saved by 2 processes and record whether each rank's slices equal the
  slices of the whole tensors.
Each rank writes rank<r>.json with its findings; the test asserts on them.

python -m torch.distributed.run --nproc_per_node N tests/sharded_io_worker.py --mode save --out DIR --tokenizers DIR
"""

import argparse
import contextlib
import json
import pickle
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from transformers import PreTrainedTokenizerFast

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sharded_worker import batches, pruned_indices  # noqa: E402
from tiny import tiny_model  # noqa: E402

from gradiend_hf import GradiendConfig, GradiendDataCollator  # noqa: E402
from gradiend_hf.fused import AdamWSteps  # noqa: E402
from gradiend_hf.model import GradiendModel  # noqa: E402
from gradiend_hf.serialization import adapter_key  # noqa: E402
from gradiend_hf.sharded_io import load_sharded_checkpoint, save_sharded_checkpoint  # noqa: E402
from gradiend_hf.sharding import sharded_training_step  # noqa: E402

CLASSES = ["female", "male"]
CASES = {
    "gpt2-dense": dict(kind="gpt2", config={}, state_dtype="float32"),
    "llama-pruned-bf16": dict(kind="llama", config={"latent_dim": 2}, pruned=True, state_dtype="bfloat16"),
}


def build(case: dict, tokenizers: Path):
    base = tiny_model(case["kind"])
    config = GradiendConfig(feature_classes=CLASSES, **case["config"])
    # pruned: a third of the first weights' entries, and 2 entries of the last one (a rank of 3 holds none of them)
    indices = {**pruned_indices(base), "model.norm.weight": torch.tensor([3, 7])} if case.get("pruned") else None
    model = GradiendModel(base, config, indices=indices)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(tokenizers / case["kind"]))
    return model, GradiendDataCollator(tokenizer, model.objective, CLASSES)


def optimizer_for(model, case):
    optimizer = torch.optim.AdamW(list(model.bottleneck.parameters()), lr=1e-2, weight_decay=0.01, fused=True)
    return optimizer, AdamWSteps(optimizer, getattr(torch, case["state_dtype"]), seed=5)


def local_state(model, optimizer) -> dict[str, torch.Tensor]:
    """Clones of this rank's bottleneck slices and AdamW state."""
    state = {f"b.{k}": v.detach().clone() for k, v in model.bottleneck.state_dict().items()}
    names = {id(p): k for k, p in model.bottleneck.named_parameters()}
    for p, entries in optimizer.state.items():
        for key, value in entries.items():
            state[f"o.{names[id(p)]}.{key}"] = value.detach().clone()
    return state


def identical(a: dict, b: dict) -> list[str]:
    """Keys whose tensors differ (bits, dtype or shape), or are missing on one side."""
    return sorted(k for k in set(a) | set(b) if k not in a or k not in b or a[k].dtype != b[k].dtype
                  or not torch.equal(a[k], b[k]))


@contextlib.contextmanager
def no_file_unpickling():
    """pickle.load (reading a pickled file) and torch.load fail inside (object collectives still unpickle what the
    ranks send each other in memory)."""
    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint load unpickled a file")

    saved = pickle.load, torch.load
    pickle.load, torch.load = refuse, refuse
    try:
        yield
    finally:
        pickle.load, torch.load = saved


def tensors_of(model, optimizer):
    """(key, base parameter name or None, tensor) of this rank's bottleneck and AdamW state: keys 'kind|name|stat'."""
    b = model.bottleneck
    found = [("encoder_bias", None, b.encoder_bias.detach())]
    found += [(f"encoder_bias|{key}", None, v) for key, v in optimizer.state[b.encoder_bias].items()]
    for name in b.names:
        for kind in ("encoder", "decoder", "offset"):
            tensor = {"encoder": b.encoder, "decoder": b.decoder, "offset": b.offset}[kind](name)
            if tensor is None:
                continue
            found.append((f"{kind}|{name}", name, tensor.detach()))
            for key, value in optimizer.state[tensor].items():
                found.append((f"{kind}|{name}|{key}", None if key == "step" else name, value))
    return found


def whole_state(model, optimizer) -> dict[str, torch.Tensor]:
    """The whole tensors of the bottleneck and of the AdamW state, assembled from the slices (on every rank)."""
    b = model.bottleneck
    return {key: value.clone() if name is None else b.assemble(name, value)
            for key, name, value in tensors_of(model, optimizer)}


def wrong_slices(model, optimizer, whole: dict) -> list[str]:
    """Keys whose local tensor is not this rank's slice of the whole tensor (bit for bit), or missing."""
    wrong = []
    for key, name, value in tensors_of(model, optimizer):
        expected = whole.get(key)
        if expected is not None and name is not None:
            start, end = model.bottleneck.bounds[name]
            expected = expected[..., start:end]
        if expected is None or value.dtype != expected.dtype or not torch.equal(value, expected):
            wrong.append(key)
    return wrong


def save_mode(out: Path, tokenizers: Path) -> dict:
    rank, report = dist.get_rank(), {}
    for name, case in CASES.items():
        model, collator = build(case, tokenizers)
        assert model.is_sharded
        optimizer, steps = optimizer_for(model, case)
        data = batches(collator)
        for batch in data[:2]:
            sharded_training_step(model, batch, optimizer, steps)
        found = {}
        try:
            model.adapter_state()
            found["adapter_state_refused"] = ""
        except RuntimeError as error:
            found["adapter_state_refused"] = str(error)
        found["kept_entries"] = model.saved_config().kept_entries
        # export; the reference: the one-process save of the whole bottleneck (a model of the same config, its
        # bottleneck swapped for the assembled one), by rank 0
        model.save_pretrained(out / name / "sharded-export")
        reference, _ = build(case, tokenizers)
        reference._swap_bottleneck(model.bottleneck.unsharded())
        assert not reference.is_sharded
        if rank == 0:
            reference.save_pretrained(out / name / "one-process")
        del reference
        found["export_visible_after_return"] = (out / name / "sharded-export" / "adapter_config.json").is_file()
        loaded = GradiendModel.from_pretrained(tiny_model(case["kind"]), out / name / "sharded-export")
        saved = load_file(str(out / name / "sharded-export" / "adapter_model.safetensors"))
        b, wrong = loaded.bottleneck, []
        for parameter in b.names:
            start, end = b.bounds[parameter]
            for kind in ("encoder", "decoder", "offset"):
                tensor = {"encoder": b.encoder, "decoder": b.decoder, "offset": b.offset}[kind](parameter)
                if tensor is None:
                    continue
                flat = saved[adapter_key(parameter, kind)]
                flat = flat.reshape(-1) if kind == "offset" else flat.reshape(b.latent_dim, -1)
                if not torch.equal(tensor.detach(), flat[..., start:end]):
                    wrong.append(f"{kind}.{parameter}")
        found["from_pretrained_sharded"] = loaded.is_sharded
        found["from_pretrained_wrong"] = wrong
        found["from_pretrained_bias_equal"] = torch.equal(b.encoder_bias.detach(), model.bottleneck.encoder_bias)
        # exact resume
        checkpoint = out / name / "checkpoint"
        save_sharded_checkpoint(model, optimizer, checkpoint, steps=steps)
        at_save = local_state(model, optimizer)
        whole = whole_state(model, optimizer)
        if rank == 0:
            save_file({k: v.contiguous() for k, v in whole.items()}, str(out / name / "whole-at-save.safetensors"))
        for batch in data[2:]:
            sharded_training_step(model, batch, optimizer, steps)
        uninterrupted = local_state(model, optimizer)
        found["moved_after_save"] = len(identical(at_save, uninterrupted))
        with no_file_unpickling():
            load_sharded_checkpoint(model, optimizer, checkpoint, steps=steps)
        found["differ_after_load"] = identical(at_save, local_state(model, optimizer))
        for batch in data[2:]:
            sharded_training_step(model, batch, optimizer, steps)
        found["differ_resumed"] = identical(uninterrupted, local_state(model, optimizer))
        # and into a fresh model and optimizer (as a restarted run), which have no AdamW state yet
        fresh, _ = build(case, tokenizers)
        fresh_optimizer, fresh_steps = optimizer_for(fresh, case)
        with no_file_unpickling():
            load_sharded_checkpoint(fresh, fresh_optimizer, checkpoint, steps=fresh_steps)
        found["differ_fresh_load"] = identical(at_save, local_state(fresh, fresh_optimizer))
        for batch in data[2:]:
            sharded_training_step(fresh, batch, fresh_optimizer, fresh_steps)
        found["differ_fresh_resumed"] = identical(uninterrupted, local_state(fresh, fresh_optimizer))
        if case["state_dtype"] != "float32":  # without its rounding generators, a resumed run rounds differently
            fresh, _ = build(case, tokenizers)
            fresh_optimizer, fresh_steps = optimizer_for(fresh, case)
            load_sharded_checkpoint(fresh, fresh_optimizer, checkpoint)
            for batch in data[2:]:
                sharded_training_step(fresh, batch, fresh_optimizer, fresh_steps)
            found["differ_resumed_without_generators"] = len(identical(uninterrupted, local_state(fresh,
                                                                                                 fresh_optimizer)))
        # a save that fails on rank 0 (a file where the folder would go) fails on every rank instead of hanging
        blocked = out / name / "a-file"
        if rank == 0:
            blocked.write_text("not a folder")
        dist.barrier()
        for what, save in (("export", lambda: model.save_pretrained(blocked)),
                           ("checkpoint", lambda: save_sharded_checkpoint(model, optimizer, blocked))):
            try:
                save()
                found[f"blocked_{what}"] = ""
            except (RuntimeError, NotADirectoryError) as error:
                found[f"blocked_{what}"] = f"{type(error).__name__}: {error}"
        bias = [torch.empty_like(model.bottleneck.encoder_bias) for _ in range(dist.get_world_size())]
        dist.all_gather(bias, model.bottleneck.encoder_bias.detach())
        found["encoder_bias_equal_on_ranks"] = all(torch.equal(bias[0], other) for other in bias)
        dist.barrier()
        report[name] = found
    return report


def load_mode(out: Path, tokenizers: Path) -> dict:
    report = {}
    for name, case in CASES.items():
        model, _ = build(case, tokenizers)
        optimizer, steps = optimizer_for(model, case)
        with no_file_unpickling():
            load_sharded_checkpoint(model, optimizer, out / name / "checkpoint", steps=steps)
        whole = load_file(str(out / name / "whole-at-save.safetensors"))
        keys = sorted(key for key, _, _ in tensors_of(model, optimizer))
        report[name] = {"world_size": dist.get_world_size(), "local_entries": model.bottleneck.local_entries,
                        "keys_equal": keys == sorted(whole), "wrong": wrong_slices(model, optimizer, whole)}
    model, _ = build(CASES["gpt2-dense"], tokenizers)  # a checkpoint of another adapter is refused
    try:
        load_sharded_checkpoint(model, None, out / "llama-pruned-bf16" / "checkpoint")
        report["other_adapter_error"] = ""
    except ValueError as error:
        report["other_adapter_error"] = str(error)
    return report


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=["save", "load"], required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--tokenizers", required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    out = Path(args.out)
    report = (save_mode if args.mode == "save" else load_mode)(out, Path(args.tokenizers))
    (out / f"{args.mode}-rank{dist.get_rank()}.json").write_text(json.dumps(report, default=str))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
