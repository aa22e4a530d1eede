"""The demo with the Python API: English gender on the real SmolLM2-135M, found and debiased (what `gradiend-hf demo`
does through gradiend_hf.app.pipeline, written out step by step).

Rows come from the data-creation recipe (Wikipedia name templates, names held out between splits); pre-pruning keeps
the top 1% of the backbone's weights by |mean gradient|; training stops once the encoder has converged and stopped
improving; the encoder is evaluated on held-out names; the decoder search picks the strengthening edits on held-out
rows and the balance edit in gender-neutral contexts; the debiased model is saved as a plain transformers folder.

    .venv/bin/python examples/gender_smollm2.py --out runs/gender
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from gradiend_hf import (GradiendConfig, GradiendTrainer, GradiendTrainingArguments, evaluate_decoder,
                         evaluate_encoder, get_gradiend_model)
from gradiend_hf.creation import english_gender_names, wikipedia_texts
from gradiend_hf.evaluation.contexts import context_probabilities, gender_neutral_contexts, summarise_contexts
from gradiend_hf.evaluation.probabilities import class_words
from gradiend_hf.offline import load_smollm2
from gradiend_hf.plotting import plot_decoder, plot_encoder, plot_training


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="runs/gender")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--learning-rate", type=float, default=1e-4)  # 1e-3 saturates the encoder
    parser.add_argument("--keep", type=float, default=0.01, help="fraction of backbone weights kept by pre-pruning")
    parser.add_argument("--rows", type=int, default=24, help="test rows and neutral texts for the decoder grid")
    args = parser.parse_args()
    out = Path(args.out)

    data = english_gender_names(wikipedia_texts(), top_names=200, names_per_template=4, neutral=200)
    base, tokenizer = load_smollm2()
    classes = ["female", "male"]
    model = get_gradiend_model(base, GradiendConfig(feature_classes=classes, pre_prune=args.keep))
    trainer = GradiendTrainer(
        model=model,
        args=GradiendTrainingArguments(output_dir=str(out / "training"), learning_rate=args.learning_rate,
                                       max_steps=args.steps, eval_steps=50, save_steps=50, logging_steps=10,
                                       per_device_train_batch_size=4, max_eval_rows=32, early_stopping_patience=1,
                                       fail_if_not_converged=True),  # never edit with an encoder that learnt nothing
        train_dataset=data["train"], eval_dataset=data["validation"], processing_class=tokenizer,
    )  # pre-pruning happens here, from training rows
    trainer.train()
    model = trainer.gradiend_model
    plot_training(trainer.state.log_history, classes, out / "training.png")

    test = data["test"].shuffle(seed=0)
    encoder = evaluate_encoder(model, test, tokenizer)
    plot_encoder(encoder, classes, out / "encoder.png")
    print("encoder on held-out names:", json.dumps(encoder.summary(), indent=1))
    if abs(encoder.correlation) < 0.8:
        raise SystemExit(f"held-out encoder |correlation| {abs(encoder.correlation):.3f} < 0.8: no edit is made.")

    contexts, words = gender_neutral_contexts(), class_words(list(test), classes, tokenizer)
    goals = ["balance", *classes]  # balance: judged in the neutral contexts, where the text leaves the class open
    decoder = evaluate_decoder(model, test.select(range(args.rows)), tokenizer,
                               neutral_texts=data["neutral"]["text"][: args.rows], goals=goals,
                               neutral_contexts=contexts, context_words=words)
    edits = {goal: decoder.best(goal) for goal in goals}
    plot_decoder(decoder, edits.values(), out / "decoder.png")
    before = summarise_contexts(context_probabilities(base, tokenizer, model.objective, contexts, words), classes)
    print(f"base: P(female)/P(male) in neutral contexts {before['ratio']:.3f}")
    for goal, edit in edits.items():
        with model.apply_edit(edit):
            after = summarise_contexts(context_probabilities(base, tokenizer, model.objective, contexts, words),
                                       classes)
        m = edit.metrics
        print(f"{goal}: ff={edit.feature_factor} lr={edit.learning_rate} -> P(female)/P(male) in neutral contexts "
              f"{after['ratio']:.3f}; LMS {m['lms']:.4f} (base {m['base_lms']:.4f})")
    model.save_pretrained(out / "adapter")
    debiased = model.merge_and_unload(edits["balance"])
    debiased.save_pretrained(out / "debiased")
    tokenizer.save_pretrained(out / "debiased")
    print(f"done: {out}")


if __name__ == "__main__":
    main()
