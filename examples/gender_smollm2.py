"""GRADIEND end to end with the Python API on the real SmolLM2-135M: English gender from Wikipedia name templates.

Builds rows with the data-creation recipe (names held out between splits), trains the bottleneck on layers 12-15
(attention + MLP), evaluates the encoder on held-out names and the decoder grid, selects the balance edit and the two
strengthening edits, saves plots, the adapter and the debiased model.

    .venv/bin/python examples/gender_smollm2.py --out runs/gender --steps 150
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from gradiend_hf import (GradiendConfig, GradiendTrainer, GradiendTrainingArguments, evaluate_decoder,
                         evaluate_encoder, get_gradiend_model)
from gradiend_hf.creation import english_gender_names, wikipedia_texts
from gradiend_hf.offline import load_smollm2
from gradiend_hf.plotting import plot_decoder, plot_encoder, plot_training


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="runs/gender")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--rows", type=int, default=24, help="test rows and neutral texts for the decoder grid")
    args = parser.parse_args()
    out = Path(args.out)

    data = english_gender_names(wikipedia_texts(), top_names=200, names_per_template=4)
    print({split: len(rows) for split, rows in data.items()})
    base, tokenizer = load_smollm2()
    config = GradiendConfig(feature_classes=["female", "male"], target_parameters=[r"model\.layers\.1[2-5]\.(self_attn|mlp)\."])
    model = get_gradiend_model(base, config)
    model.print_trainable_parameters()
    trainer = GradiendTrainer(
        model=model,
        args=GradiendTrainingArguments(output_dir=str(out / "training"), learning_rate=args.learning_rate,
                                       max_steps=args.steps, eval_steps=25, save_steps=25, logging_steps=5,
                                       per_device_train_batch_size=4, max_eval_rows=64),
        train_dataset=data["train"], eval_dataset=data["validation"], processing_class=tokenizer,
    )
    trainer.train()
    plot_training(trainer.state.log_history, config.feature_classes, out / "training.png")

    test = data["test"].shuffle(seed=0).select(range(min(args.rows, len(data["test"]))))
    encoder = evaluate_encoder(model, test, tokenizer)
    plot_encoder(encoder, config.feature_classes, out / "encoder.png")
    print("encoder", json.dumps(encoder.summary(), indent=1))

    neutral = data["neutral"]["text"][: args.rows]
    decoder = evaluate_decoder(model, test, tokenizer, neutral_texts=neutral)
    edits = {goal: decoder.best(goal) for goal in ("balance", "female", "male")}
    plot_decoder(decoder, edits.values(), out / "decoder.png")
    for goal, edit in edits.items():
        m = edit.metrics
        print(f"{goal}: ff={edit.feature_factor} lr={edit.learning_rate} P={m['probabilities']} base P={m['base_probabilities']} "
              f"LMS {m['lms']:.4f} / base {m['base_lms']:.4f}")
    decoder.grid.to_csv(out / "decoder_grid.csv", index=False)
    model.save_pretrained(out / "adapter")
    debiased = model.merge_and_unload(edits["balance"])
    debiased.save_pretrained(out / "debiased")
    tokenizer.save_pretrained(out / "debiased")
    print(f"done: {out}")


if __name__ == "__main__":
    main()
