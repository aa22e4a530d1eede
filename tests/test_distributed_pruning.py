"""Pre-pruning across processes (distributed_pruning.py, gloo on 127.0.0.1) against the single-process oracle:
pruning.pre_prune / importance / select_top on the same model and rows.

Each group of processes runs every case once (spawning costs seconds), saves what each rank got, and the tests compare
those files with the single-process results computed here. Two processes, and three for uneven slices.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_pruning import CLASSES, CONTEXTS, base_indices, feature_rows
import tiny
from tiny import tiny_model, tokenizer_for

import gradiend_hf.distributed_pruning as distributed_pruning
import gradiend_hf.pruning as pruning
import gradiend_hf.topk as topk
from gradiend_hf import GradiendConfig, GradiendDataCollator, get_gradiend_model
from gradiend_hf.distributed_pruning import ImportanceShard, select_top_sharded, sharded_importance
from gradiend_hf.sharding import distributed_world
from gradiend_hf.pruning import importance_batches, keep_count, pre_prune, select_top
from gradiend_hf.shards import shard_bounds, shard_chunk

ROWS = dict(rows=12, batch_size=4, seed=3)  # 4 batches: 2 + 2 on two processes, 2 + 1 + 1 on three
# (name, architecture, gradient kind, aggregate, keep): the thresholds are picked from the oracle's importance
PRE_PRUNE = [
    ("gpt2_fraction", "gpt2", "diff", "mean", 0.1),
    ("gpt2_count", "gpt2", "alternative", "abs", 37),
    ("gpt2_threshold", "gpt2", "diff", "mean", None),
    ("llama_label", "llama", "factual", "label", 0.05),
    ("bert_fraction", "bert", "diff", "mean", 0.2),
]
NAMES = [case[0] for case in PRE_PRUNE]
THREE = ("gpt2_fraction", "gpt2_threshold", "bert_fraction")  # the cases three processes repeat
IMPORTANCE = [("gpt2", "diff", "mean"), ("llama", "factual", "label")]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tie_scores() -> dict[str, torch.Tensor]:
    """Scores with many exact ties (at the cut of most keeps), zeros, an empty and a one-entry parameter."""
    generator = torch.Generator().manual_seed(0)
    return {
        "a": torch.randint(0, 5, (6, 5), generator=generator).float() / 4,
        "b": torch.zeros(13),
        "empty": torch.zeros(0),
        "c": torch.rand(40, generator=generator),
        "d": torch.full((3, 3), 0.5),
        "one": torch.full((1,), 0.25),
        "e": torch.rand(60, generator=generator) * 10.0 ** torch.randint(-40, 30, (60,), generator=generator).float(),
    }


def all_equal() -> dict[str, torch.Tensor]:
    return {"x": torch.full((7,), 0.5), "y": torch.full((2, 4), 0.5), "z": torch.full((5,), 0.5)}


def tie_keeps(scores: dict) -> list:
    total = sum(s.numel() for s in scores.values())
    return sorted({1, 2, 3, 7, 30, 31, 45, 90, total - 1, total}) + [0.01, 0.1, 0.25, 0.5, 0.999, 1.0]


TIE_THRESHOLDS = {"ties": [0.0, 0.25, 0.5, 0.75, 0.9], "all_equal": [0.25, 0.5]}


def my_shards(scores: dict, rank: int, world: int) -> dict[str, ImportanceShard]:
    out = {}
    for name, s in scores.items():
        start, end = shard_bounds(s.numel(), rank, world)
        out[name] = ImportanceShard(s.reshape(-1)[start:end].clone(), start, s.numel())
    return out


def error_of(call) -> str:
    try:
        call()
    except (ValueError, TypeError) as error:
        return f"{type(error).__name__}: {error}"
    return "no error"


def pre_prune_case(name: str, thresholds: dict, base=None, **extra):
    _, kind, data_kind, aggregate, keep = next(c for c in PRE_PRUNE if c[0] == name)
    threshold = thresholds.get(name)
    return pre_prune(base if base is not None else tiny_model(kind), feature_rows(CONTEXTS), tokenizer_for(kind),
                     keep, threshold=threshold, kind=data_kind, aggregate=aggregate,
                     config=GradiendConfig(feature_classes=CLASSES), **ROWS, **extra)


def summary(model) -> dict:
    """The adapter's whole selection (base coordinates) and its tensors' sizes here. Under torch.distributed a
    GradiendModel may hold only this process's slice of the bottleneck (sharding.py): then `local` counts the slice."""
    b = model.bottleneck
    sharded = getattr(model, "is_sharded", False)
    return {"indices": {n: (torch.arange(b.shapes[n].numel()) if b.selected_indices(n) is None
                            else b.selected_indices(n).cpu()) for n in b.names} if sharded else base_indices(model),
            "shapes": {n: tuple(b.encoder(n).shape) for n in b.names}, "sharded": sharded,
            "entries": model.num_entries, "record": model.gradiend_config.pruning[-1]}


# --- the worker: one process of the group ---------------------------------------------------------------------------
def worker(rank: int, world: int, port: int, out: str, cases: tuple, thresholds: dict, tokenizers: tuple) -> None:
    torch.set_num_threads(1)
    # the tokenizers of the parent process: WordPiece training is not reproducible across processes
    tiny.wordpiece_tokenizer, tiny.bpe_tokenizer = (lambda: tokenizers[0]), (lambda: tokenizers[1])
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        got: dict = {"process_count": distributed_world()}
        topk.CHUNK = 7  # several chunks per slice, so the chunked passes are exercised too
        for label, scores in (("ties", tie_scores()), ("all_equal", all_equal())):
            got[label] = [select_top_sharded(my_shards(scores, rank, world), keep) for keep in tie_keeps(scores)]
            got[label + "_threshold"] = {t: select_top_sharded(my_shards(scores, rank, world), threshold=t)
                                         for t in TIE_THRESHOLDS[label]}
        shards = my_shards(tie_scores(), rank, world)
        released = select_top_sharded(shards, 0.3, release=True)
        got["released"] = (released, len(shards))
        bad = my_shards(tie_scores(), rank, world)
        if rank == 1:
            bad["c"].values[0] = float("nan")  # one process only: every process must raise, none may hang
        got["errors"] = [error_of(lambda: select_top_sharded(my_shards(tie_scores(), rank, world), threshold=1e38)),
                         error_of(lambda: select_top_sharded(bad, 0.5)),
                         error_of(lambda: select_top_sharded(my_shards(tie_scores(), rank, world), 5 + rank))]
        topk.CHUNK = 1 << 22
        if "importance" in cases:
            got["importance"], got["engines"] = {}, {}
            engines = []

            class Spy(distributed_pruning.ShardedImportanceEngine):
                def __init__(self, *a, **k):
                    super().__init__(*a, **k)
                    engines.append(self)
                    self.sizes = {n: t.numel() for n, t in self.padded.items()}

            distributed_pruning.ShardedImportanceEngine = Spy
            for kind, data_kind, aggregate in IMPORTANCE:
                dense = get_gradiend_model(tiny_model(kind), GradiendConfig(feature_classes=CLASSES))
                batches = importance_batches(feature_rows(CONTEXTS), CLASSES, **ROWS)
                collate = GradiendDataCollator(tokenizer_for(kind), dense.objective, CLASSES)
                got["importance"][kind] = sharded_importance(
                    tiny_model(kind), pruning.Selection(dense.bottleneck.shapes), batches, collate, data_kind,
                    aggregate, CLASSES)
                engine = engines.pop()
                got["engines"][kind] = (engine.sizes, dict(engine.accumulators), dict(engine.padded))
        got["pre_prune"] = {name: summary(pre_prune_case(name, thresholds)) for name in cases if name in NAMES}
        if "compose" in cases:
            first = pre_prune(tiny_model("gpt2"), feature_rows(CONTEXTS), tokenizer_for("gpt2"), 0.3,
                              config=GradiendConfig(feature_classes=CLASSES))
            got["compose"] = summary(pre_prune(first, feature_rows(CONTEXTS), tokenizer_for("gpt2"), 0.1, rows=8))
        if "trainer" in cases:
            got["trainer"] = trainer_path()
        torch.save(got, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def trainer_path() -> dict:
    """GradiendTrainer's route (maybe_pre_prune on a config with pre_prune=): the bottlenecks built on the way."""
    built = []
    original = pruning.GradiendModel.__init__

    def spy(self, *a, **k):
        original(self, *a, **k)
        built.append((self.num_entries, self.bottleneck.allocated))

    pruning.GradiendModel.__init__ = spy
    try:
        config = GradiendConfig(feature_classes=CLASSES, pre_prune=0.15, pre_prune_rows=8)
        model = get_gradiend_model(tiny_model("gpt2"), config)
        placeholder = (model.awaits_pre_pruning, model.bottleneck.allocated)
        collate = GradiendDataCollator(tokenizer_for("gpt2"), model.objective, CLASSES)
        same = pruning.maybe_pre_prune(model, feature_rows(CONTEXTS[:4]), collate, batch_size=2, seed=0)
    finally:
        pruning.GradiendModel.__init__ = original
    return {"built": built, "placeholder": placeholder, "same": same is model, **summary(model)}


def run_group(world: int, folder: Path, cases: tuple, thresholds: dict) -> list[dict]:
    tokenizers = (tiny.wordpiece_tokenizer(), tiny.bpe_tokenizer())
    mp.spawn(worker, args=(world, free_port(), str(folder), cases, thresholds, tokenizers), nprocs=world, join=True)
    return [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(world)]


# --- the single-process oracle and the two groups ------------------------------------------------------------------
def oracle_importance(kind, data_kind, aggregate) -> dict:
    dense = get_gradiend_model(tiny_model(kind), GradiendConfig(feature_classes=CLASSES))
    batches = importance_batches(feature_rows(CONTEXTS), CLASSES, **ROWS)
    collate = GradiendDataCollator(tokenizer_for(kind), dense.objective, CLASSES)
    return pruning.importance(tiny_model(kind), pruning.Selection(dense.bottleneck.shapes), batches, collate,
                              data_kind, aggregate, CLASSES)


def gap_threshold(scores: dict) -> float:
    """A threshold in the widest gap among the top 80 values, so float rounding of the sums cannot decide it."""
    ranked = torch.cat([s.reshape(-1) for s in scores.values()]).sort(descending=True).values[:80]
    i = int((ranked[10:-1] - ranked[11:]).argmax()) + 10
    return float(ranked[i] + ranked[i + 1]) / 2


@pytest.fixture(scope="module")
def oracle() -> dict:
    assert not dist.is_initialized()  # the single-process path
    importance = {kind: oracle_importance(kind, d, a) for kind, d, a in IMPORTANCE}
    thresholds = {"gpt2_threshold": gap_threshold(importance["gpt2"])}  # gpt2, diff, mean: as IMPORTANCE[0]
    pre = {name: summary(pre_prune_case(name, thresholds)) for name, *_ in PRE_PRUNE}
    first = pre_prune(tiny_model("gpt2"), feature_rows(CONTEXTS), tokenizer_for("gpt2"), 0.3,
                      config=GradiendConfig(feature_classes=CLASSES))
    compose = summary(pre_prune(first, feature_rows(CONTEXTS), tokenizer_for("gpt2"), 0.1, rows=8))
    return {"importance": importance, "thresholds": thresholds, "pre_prune": pre, "compose": compose,
            "trainer": trainer_path()}


@pytest.fixture(scope="module")
def groups(oracle, tmp_path_factory) -> dict[int, list[dict]]:
    cases2 = ("importance", "compose", "trainer", *(name for name, *_ in PRE_PRUNE))
    cases3 = ("importance", *THREE)
    return {2: run_group(2, tmp_path_factory.mktemp("two"), cases2, oracle["thresholds"]),
            3: run_group(3, tmp_path_factory.mktemp("three"), cases3, oracle["thresholds"])}


def same_positions(a: dict, b: dict) -> bool:
    return list(a) == list(b) and all((a[n] is None and b[n] is None) or (a[n] is not None and b[n] is not None
                                                                         and torch.equal(a[n], b[n])) for n in a)


def same_summary(mine: dict, expected: dict, rank: int = 0, world: int = 1) -> bool:
    """The same selection, and the adapter's tensors: the one-process shapes, or this rank's slice of them."""
    names = list(expected["indices"])
    if list(mine["indices"]) != names or mine["entries"] != expected["entries"]:
        return False
    if not all(torch.equal(mine["indices"][n], expected["indices"][n]) for n in names):
        return False
    if not mine["sharded"]:
        return mine["shapes"] == expected["shapes"]
    for n in names:
        start, end = shard_bounds(expected["indices"][n].numel(), rank, world)
        if mine["shapes"][n] != (expected["shapes"][n][0], end - start):
            return False
    return True


# --- tests ------------------------------------------------------------------------------------------------------------
def test_shard_bounds_is_the_torch_chunk_layout():
    for count in range(0, 70):
        for world in range(1, 12):
            bounds = [shard_bounds(count, r, world) for r in range(world)]
            assert bounds[0][0] == 0 and bounds[-1][1] == count
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))  # contiguous, in rank order
            sizes = [end - start for start, end in bounds]
            if count:
                assert [s for s in sizes if s] == [c.numel() for c in torch.arange(count).chunk(world)]
            assert all(s == shard_chunk(count, world) for s in sizes[: count // max(shard_chunk(count, world), 1)])
    assert shard_bounds(10**12 + 3, 3, 4) == (750000000003, 10**12 + 3)
    for bad, error in [((5, 2, 2), ValueError), ((5, -1, 2), ValueError), ((-1, 0, 2), ValueError),
                       ((5, 0, 0), ValueError), ((5.0, 0, 2), TypeError), ((5, True, 2), TypeError)]:
        with pytest.raises(error):
            shard_bounds(*bad)


@pytest.mark.parametrize("world", [2, 3])
def test_distributed_top_k_equals_select_top_with_many_ties(groups, world):
    for label, make in (("ties", tie_scores), ("all_equal", all_equal)):
        scores = make()
        for i, keep in enumerate(tie_keeps(scores)):  # a list: 1 and 1.0 are different keeps but equal dict keys
            expected = select_top(scores, keep)
            for rank, got in enumerate(groups[world]):
                positions, info = got[label][i]
                assert same_positions(positions, expected[0]), (label, keep, rank)
                assert info == expected[1], (label, keep, rank)
        for threshold in TIE_THRESHOLDS[label]:
            expected = select_top(scores, threshold=threshold)
            for got in groups[world]:
                positions, info = got[label + "_threshold"][threshold]
                assert same_positions(positions, expected[0]) and info == expected[1], (label, threshold)
    for got in groups[world]:
        assert got["process_count"] == world
        assert same_positions(got["released"][0][0], select_top(tie_scores(), 0.3)[0]) and got["released"][1] == 0


@pytest.mark.parametrize("world", [2, 3])
def test_errors_are_raised_on_every_process(groups, world):
    for got in groups[world]:
        no_entry, nan, mismatch = got["errors"]
        assert no_entry == error_of(lambda: select_top(tie_scores(), threshold=1e38))  # the one-process message
        assert nan.startswith("ValueError: The importance of c holds negative or non-finite") and "process 1" in nan
        assert "same arguments on every process" in mismatch and "other keep than process 0" in mismatch


@pytest.mark.parametrize("world", [2, 3])
def test_each_process_owns_its_slice_of_the_single_process_importance(oracle, groups, world):
    for kind, *_ in IMPORTANCE:
        expected = oracle["importance"][kind]
        for rank, got in enumerate(groups[world]):
            shards = got["importance"][kind]
            assert list(shards) == list(expected)
            for name, shard in shards.items():
                flat = expected[name].reshape(-1)
                start, end = shard_bounds(flat.numel(), rank, world)
                assert (shard.start, shard.count, shard.values.numel()) == (start, flat.numel(), end - start)
                # the sum runs in another order (per process, then across): entries that nearly cancel to 0 differ
                # by float rounding relative to the parameter's scale, not to their own size
                torch.testing.assert_close(shard.values, flat[start:end], rtol=1e-6, atol=1e-6 * float(flat.max()))
            # memory: one raw accumulator per entry, padded for reduce-scatter and handed over (freed) once reduced
            sizes, accumulators, padded = got["engines"][kind]
            assert sizes == {n: shard_chunk(s.numel(), world) * world for n, s in expected.items()}
            assert accumulators == {} and padded == {}


@pytest.mark.parametrize("world", [2, 3])
def test_distributed_pre_pruning_keeps_the_same_entries_as_one_process(oracle, groups, world):
    cases = [name for name, *_ in PRE_PRUNE] if world == 2 else list(THREE)
    for name in cases:
        expected = oracle["pre_prune"][name]
        for rank, got in enumerate(groups[world]):
            mine = got["pre_prune"][name]
            assert same_summary(mine, expected, rank, world), (name, rank)
            assert mine["record"] == {**expected["record"], "cutoff": mine["record"]["cutoff"], "processes": world}
            assert mine["record"]["cutoff"] == pytest.approx(expected["record"]["cutoff"], rel=1e-5)
    assert "processes" not in oracle["pre_prune"]["gpt2_fraction"]["record"]
    k = oracle["pre_prune"]["gpt2_count"]["record"]
    assert k["kept"] == keep_count(37, k["total"]) == 37


def test_distributed_pre_pruning_of_a_pruned_adapter_and_the_trainer_path(oracle, groups):
    for rank, got in enumerate(groups[2]):
        assert same_summary(got["compose"], oracle["compose"], rank, 2)
        trainer, expected = got["trainer"], oracle["trainer"]
        assert trainer["placeholder"] == (True, False) and trainer["same"]
        # the only bottleneck built allocated is the pruned one: no dense adapter before pre-pruning
        assert [entries for entries, allocated in trainer["built"] if allocated] == [trainer["entries"]]
        assert trainer["built"] == expected["built"]
        assert same_summary(trainer, expected, rank, 2) and trainer["record"]["processes"] == 2


def test_single_process_path_when_no_group_is_initialised():
    assert distributed_world() == 1
    with pytest.raises(RuntimeError, match="initialised torch.distributed"):
        select_top_sharded(my_shards(tie_scores(), 0, 1), 0.5)

