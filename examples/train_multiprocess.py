"""Train a GRADIEND adapter on several processes with accelerate (the bottleneck sharded, or DDP replicas).

    accelerate launch --config_file examples/accelerate_cpu.yaml examples/train_multiprocess.py --out runs/mp
    accelerate launch --config_file examples/accelerate_cpu.yaml examples/train_multiprocess.py --out runs/mp --ddp
    accelerate launch --config_file examples/accelerate_cpu.yaml examples/train_multiprocess.py --out runs/mp-smol \
        --model smollm2 --steps 4

The config starts 2 local processes (see its comments for why it says MULTI_GPU); without a GPU they form a CPU
process group (gloo). Without a config file: `accelerate launch --multi_gpu --num_processes 2 ... --cpu`. (Plain
`accelerate launch --cpu --num_processes 2` starts one process unless MPI is set up.) On a machine with GPUs, --cpu
keeps the training on the CPU.

How it divides the work by default (sharded, docs/distributed.md): each process holds 1/N of the bottleneck; every
step reads one batch of N x --batch-size rows of one transition, each process computes its share of the rows, and
each base gradient is reduce-scattered so each process gets its slice of the whole batch's gradient: N processes
with --batch-size B train as one process with N x B.

With --ddp (shard_bottleneck=False): GradiendTrainer deals the transition sampler's batches round robin to the
processes (whole batches, one transition each), so each process computes its own gradient rows with the frozen base
model. DDP
all-reduces only the parameters that require grad when it wraps the model: the bottleneck's. The base parameters
require grad only for a moment inside `GradiendModel.forward` (the gradient engine's inner backward), and their
gradients are taken by hooks into per-process buffers, so they are never averaged across processes. One optimizer step
thus trains on the mean of the processes' bottleneck gradients, as gradient accumulation over their batches would.

Evaluation (forward-mode encodings of the evaluation rows) runs on every process over all evaluation rows: the
bottlenecks are identical, so every process takes the same sign-normalisation and best-checkpoint decisions.
Checkpoints and the final adapter are written by the main process only.

Besides the adapter (--out/adapter) every process writes evidence of what it did into --out:
    rank{r}.safetensors  the final bottleneck tensors ("bottleneck/<key>") and the base-model gradients the process
                         gathered on its last training step ("gradient/<kind>/<parameter>")
    rank{r}.json         rank, world size, the row ids and transition of every batch it trained on, its local
                         losses, the evaluations it ran and the final train loss
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from gradiend_hf import GradiendConfig, GradiendDataCollator, get_gradiend_model  # noqa: E402
from gradiend_hf.trainer import GradiendTrainer, GradiendTrainingArguments  # noqa: E402

CLASSES = ["female", "male"]
WORDS = {"female": ["she", "her"], "male": ["he", "his"]}
TRAIN_CONTEXTS = [
    "the nurse said that [MASK] was in the room",
    "the doctor said that [MASK] went home",
    "and then [MASK] went home",
    "they said [MASK] was good",
    "the results were bad and [MASK] went home",
    "it was good that [MASK] said it",
    "the nurse and [MASK] went in",
    "the teacher told me that [MASK] was right",
]
EVAL_CONTEXTS = [
    "the doctor and [MASK] went in",
    "my friend said [MASK] was tired",
    "the results were good and [MASK] said it",
    "then the teacher asked why [MASK] went home",
]
# SmolLM2: a small slice of the model, so a step takes well under a second on a CPU
SMOLLM2_TARGETS = [r"model\.layers\.2[89]\.mlp\.down_proj\.weight"]


def gender_rows(contexts: Sequence[str]) -> list[dict[str, Any]]:
    """Both transitions (female->male, male->female) of every context and word pair; `row_id` numbers the rows."""
    rows = []
    for context in contexts:
        for factual_class, alternative_class in ((CLASSES[0], CLASSES[1]), (CLASSES[1], CLASSES[0])):
            for factual, alternative in zip(WORDS[factual_class], WORDS[alternative_class]):
                rows.append(
                    dict(masked=context, factual=factual, alternative=alternative, factual_class=factual_class,
                         alternative_class=alternative_class, row_id=len(rows))
                )
    return rows


def tiny_gpt2(seed: int = 0):
    """(model, tokenizer): a 2-layer GPT-2 with a word-level tokenizer over the words of this script; no download."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    text = " ".join(TRAIN_CONTEXTS + EVAL_CONTEXTS).replace("[MASK]", " ")
    words = sorted(set(text.split()) | {w for ws in WORDS.values() for w in ws})
    vocab = {token: i for i, token in enumerate(["<|endoftext|>", "[UNK]", *words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>",
        unk_token="[UNK]",
    )
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(vocab), n_embd=16, n_layer=2, n_head=2, n_positions=32, bos_token_id=0,
                        eos_token_id=0, pad_token_id=0)
    return GPT2LMHeadModel(config).eval(), tokenizer


class RowIdCollator:
    """The GRADIEND collator plus a `row_id` tensor, so the trainer can record which rows a batch held."""

    def __init__(self, inner: GradiendDataCollator) -> None:
        self.inner = inner

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self.inner(rows)
        batch["row_id"] = torch.tensor([int(r["row_id"]) for r in rows])
        return batch


class EvidenceTrainer(GradiendTrainer):
    """GradiendTrainer that records, per training step, the rows and the local loss of this process, and keeps a
    copy of the base-model gradients the gradient engine gathered (its buffers are overwritten every step)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seen_rows: list[list[int]] = []
        self.seen_transitions: list[list[str]] = []
        self.local_losses: list[float] = []
        self.last_gradients: dict[str, dict[str, torch.Tensor]] = {}

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        """The plain step's loss (DDP, gradient accumulation)."""
        row_ids = inputs.pop("row_id")
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        self.record(row_ids, inputs, result[0] if return_outputs else result)
        return result

    def fused_training_step(self, model, inputs) -> torch.Tensor:
        """The fused (and the sharded) step: the batch every process reads, and its loss."""
        row_ids = inputs.pop("row_id")
        loss = super().fused_training_step(model, inputs)
        self.record(row_ids, inputs, loss)
        return loss

    def record(self, row_ids: torch.Tensor, inputs: dict[str, torch.Tensor], loss: torch.Tensor) -> None:
        classes = self.gradiend_model.gradiend_config.feature_classes
        pairs = zip(inputs["factual_class"].tolist(), inputs["alternative_class"].tolist())
        self.seen_rows.append(row_ids.tolist())
        self.seen_transitions.append(sorted({f"{classes[f]}->{classes[a]}" for f, a in pairs}))
        self.local_losses.append(float(loss.detach()))
        buffers = self.gradiend_model.engine.buffers
        self.last_gradients = {kind: {n: t.detach().clone() for n, t in b.items()} for kind, b in buffers.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/multiprocess"), help="output folder")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps (each process trains one batch per step)")
    parser.add_argument("--model", choices=("tiny", "smollm2"), default="tiny",
                        help="tiny GPT-2 (seconds) or SmolLM2-135M")
    parser.add_argument("--batch-size", type=int, default=4, help="rows per process behind one gradient")
    parser.add_argument("--ddp", action="store_true",
                        help="DDP replicas of the whole bottleneck (shard_bottleneck=False) instead of 1/N per process")
    parser.add_argument("--learning-rate", type=float, default=None, help="default 1e-2 (tiny) / 1e-4 (smollm2)")
    parser.add_argument("--gradient-accumulation-steps", type=int, default=1,
                        help="batches per optimizer step and process (one process with N here trains on the same "
                             "batch pairs as N processes with 1)")
    parser.add_argument("--eval-steps", type=int, default=2, help="evaluate and checkpoint every N steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true", help="resume from the last complete checkpoint in --out/run")
    parser.add_argument("--optimizer-state-dtype", choices=("float32", "bfloat16"), default="float32",
                        help="AdamW moments of the bottleneck (bfloat16: stochastically rounded)")
    parser.add_argument("--cpu", action="store_true", help="train on the CPU even when a GPU is visible")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    if args.model == "tiny":
        base, tokenizer = tiny_gpt2(args.seed)
        config = GradiendConfig(feature_classes=CLASSES, init_seed=args.seed)
        learning_rate = args.learning_rate or 1e-2
    else:
        from gradiend_hf.offline import load_smollm2

        base, tokenizer = load_smollm2()
        config = GradiendConfig(feature_classes=CLASSES, init_seed=args.seed, target_parameters=SMOLLM2_TARGETS)
        learning_rate = args.learning_rate or 1e-4
    model = get_gradiend_model(base, config)
    train_rows, eval_rows = gender_rows(TRAIN_CONTEXTS), gender_rows(EVAL_CONTEXTS)

    trainer = EvidenceTrainer(
        model=model,
        args=GradiendTrainingArguments(
            output_dir=str(args.out / "run"),
            max_steps=args.steps,
            per_device_train_batch_size=args.batch_size,
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            learning_rate=learning_rate,
            eval_steps=args.eval_steps,
            save_steps=args.eval_steps,
            logging_steps=args.eval_steps,
            seed=args.seed,
            disable_tqdm=True,
            shard_bottleneck=not args.ddp,
            optimizer_state_dtype=args.optimizer_state_dtype,
            # Without a GPU the processes must ask for the CPU, or accelerate sets up no process group at all.
            use_cpu=args.cpu or not torch.cuda.is_available(),
        ),
        train_dataset=train_rows,
        eval_dataset=eval_rows,
        processing_class=tokenizer,
        data_collator=RowIdCollator(GradiendDataCollator(tokenizer, model.objective, CLASSES)),
    )
    output = trainer.train(resume_from_checkpoint=True if args.resume else None)
    trainer.save_model(str(args.out / "adapter"))  # written by the main process only

    rank, world_size = trainer.args.process_index, trainer.args.world_size
    tensors = {f"bottleneck/{k}": v.detach().cpu().contiguous() for k, v in model.bottleneck.state_dict().items()}
    for kind, buffers in trainer.last_gradients.items():
        tensors.update({f"gradient/{kind}/{name}": t.cpu().contiguous() for name, t in buffers.items()})
    args.out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(args.out / f"rank{rank}.safetensors"))
    evaluations = [entry for entry in trainer.state.log_history if "eval_correlation" in entry]
    record = {
        "rank": rank,
        "world_size": world_size,
        "model": args.model,
        "global_step": trainer.state.global_step,
        "batches": len(trainer.seen_rows),
        "rows": sum(len(ids) for ids in trainer.seen_rows),
        "row_ids": trainer.seen_rows,
        "transitions": trainer.seen_transitions,
        "dataset_rows": len(train_rows),
        "local_losses": trainer.local_losses,
        "train_loss": output.training_loss,
        "evaluations": evaluations,
        "best_model_checkpoint": trainer.state.best_model_checkpoint,
        "converged": trainer.verdict["converged"],
    }
    (args.out / f"rank{rank}.json").write_text(json.dumps(record, indent=2), encoding="utf-8")
    trainer.accelerator.wait_for_everyone()
    if trainer.accelerator.is_main_process:
        print(
            f"trained {trainer.state.global_step} steps on {world_size} process(es); "
            f"train loss {output.training_loss:.6g}; "
            f"adapter in {args.out / 'adapter'}, evidence in {args.out}/rank*.json|safetensors",
            flush=True,
        )


if __name__ == "__main__":
    main()
