"""GRADIEND on a real masked LM of chemistry: chlorine vs bromine in reaction SMILES, on rxnmapper's ALBERT.

rxnmapper's ALBERT (0.8M weights, trained with masked-language modelling on 1.3M USPTO reaction SMILES) fills a
masked atom of a reaction. Cl and Br are the interchangeable pair here: both are halogen substituents and leaving
groups, so a [MASK] where one of them was can take either. A row masks one Cl or Br token of a reaction; the factual
word is the halogen that was there, the alternative the other one. Each hand-written reaction below also appears
with every Cl and Br swapped (its "twin"), which balances the classes; reactions (with their twins) are split
between train/validation/test, so test rows come from reactions never seen in training.

    .venv/bin/python examples/chemistry_albert.py --out runs/chemistry

The learning rate is 1e-6, lower than the 1e-5 usual for BERT-size models: with 1e-4 or 1e-5 the feature neuron
saturates at the same sign for both classes within 25 steps (Adam moves each of the 626k encoder entries by about
the learning rate per step, and these gradients are large: norm ~120 per row) and never recovers.

Prints the encoder's held-out figures (correlation, per-class mean h, neutral rows: a random C/c/N/O/n re-masked as
an identity row) and the decoder grid's chosen edits (balance, strengthen chlorine, strengthen bromine).
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

from gradiend_hf import (GradiendConfig, GradiendTrainer, GradiendTrainingArguments, evaluate_decoder,
                         evaluate_encoder, get_gradiend_model)
from gradiend_hf.offline import SMILES_PATTERN, load_rxnmapper_albert

CLASSES = ["chlorine", "bromine"]  # chlorine reads +1
WORD = {"Cl": "chlorine", "Br": "bromine"}
OTHER = {"Cl": "Br", "Br": "Cl"}

# Hand-written reaction SMILES in USPTO style (reactants>>product), each with Cl and/or Br.
REACTIONS = [
    # amides and sulfonamides from acid chlorides
    "O=C(Cl)c1ccc(Br)cc1.NCc1ccccc1>>O=C(NCc1ccccc1)c1ccc(Br)cc1",
    "CC(=O)Cl.Nc1ccc(Cl)cc1>>CC(=O)Nc1ccc(Cl)cc1",
    "O=C(Cl)c1ccccc1.NC1CCN(Cc2ccc(Br)cc2)CC1>>O=C(NC1CCN(Cc2ccc(Br)cc2)CC1)c1ccccc1",
    "O=C(Cl)c1cccc(Cl)c1.C1COCCN1>>O=C(c1cccc(Cl)c1)N1CCOCC1",
    "O=S(=O)(Cl)c1ccc(Br)cc1.NC1CC1>>O=S(=O)(NC1CC1)c1ccc(Br)cc1",
    "Cc1ccc(S(=O)(=O)Cl)cc1.Nc1ccc(Br)cn1>>Cc1ccc(S(=O)(=O)Nc2ccc(Br)cn2)cc1",
    # N- and O-alkylation with benzyl / alkyl halides
    "BrCc1ccc(Cl)cc1.C1CCNCC1>>Clc1ccc(CN2CCCCC2)cc1",
    "ClCc1ccccc1.O=C1NC(=O)c2ccccc21>>O=C1c2ccccc2C(=O)N1Cc1ccccc1",
    "BrCc1cccc(Br)c1.CN1CCNCC1>>CN1CCN(Cc2cccc(Br)c2)CC1",
    "Oc1ccc(Br)cc1.BrCC(=O)OCC>>CCOC(=O)COc1ccc(Br)cc1",
    "Oc1ccc(Cl)cc1Cl.ClCc1ccccc1>>Clc1ccc(OCc2ccccc2)c(Cl)c1",
    "CC(C)(C)OC(=O)N1CCC(CBr)CC1.Oc1ccc(Cl)cc1>>CC(C)(C)OC(=O)N1CCC(COc2ccc(Cl)cc2)CC1",
    "ClCCCBr.O=C1NC(=O)c2ccccc21>>O=C1c2ccccc2C(=O)N1CCCCl",
    # cross-couplings
    "Brc1ccc(Cl)cc1.OB(O)c1ccccc1>>Clc1ccc(-c2ccccc2)cc1",
    "COc1ccc(B(O)O)cc1.Brc1cccnc1>>COc1ccc(-c2cccnc2)cc1",
    "Cc1ccc(Br)cc1.OB(O)c1ccc(C=O)cc1>>Cc1ccc(-c2ccc(C=O)cc2)cc1",
    "Brc1ccccc1Cl.Nc1ccccc1>>Clc1ccccc1Nc1ccccc1",
    "Clc1ccc(Br)cn1.C1COCCN1>>Clc1ccc(N2CCOCC2)cn1",
    "C#Cc1ccccc1.Brc1ccc(C(C)=O)cc1>>CC(=O)c1ccc(C#Cc2ccccc2)cc1",
    # aromatic substitution
    "O=[N+]([O-])c1ccc(F)cc1Cl.C1CCNC1>>O=[N+]([O-])c1ccc(N2CCCC2)cc1Cl",
    "Clc1ncccn1.NCc1ccc(Br)cc1>>Brc1ccc(CNc2ncccn2)cc1",
    "Clc1nc(Cl)c2ccccc2n1.Nc1ccc(F)c(Cl)c1>>Clc1nc(Nc2ccc(F)c(Cl)c2)c2ccccc2n1",
    # reductions, hydrolysis, esterification, protection (the halogen is carried along)
    "O=[N+]([O-])c1ccc(Cl)cc1>>Nc1ccc(Cl)cc1",
    "O=Cc1ccc(Br)cc1>>OCc1ccc(Br)cc1",
    "COC(=O)c1ccc(Cl)c(Cl)c1>>OCc1ccc(Cl)c(Cl)c1",
    "CC(=O)c1ccc(Br)cc1>>CC(O)c1ccc(Br)cc1",
    "COC(=O)c1ccc(Br)s1>>O=C(O)c1ccc(Br)s1",
    "O=C(O)c1cc(Cl)ccc1Cl.CO>>COC(=O)c1cc(Cl)ccc1Cl",
    "CC(C)(C)OC(=O)OC(=O)OC(C)(C)C.Nc1ccc(Br)cc1>>CC(C)(C)OC(=O)Nc1ccc(Br)cc1",
    "CC(C)(C)OC(=O)N1CCN(c2ccc(Cl)cc2)CC1>>Clc1ccc(N2CCNCC2)cc1",
    "N#Cc1ccc(Br)cc1>>NCc1ccc(Br)cc1",
    "OC(=O)c1ccc(Cl)nc1.Nc1ccccc1>>O=C(Nc1ccccc1)c1ccc(Cl)nc1",
    "Clc1ccc(C(=O)O)cc1.OCC>>CCOC(=O)c1ccc(Cl)cc1",
    "O=C(O)Cc1ccc(Br)cc1.NC1CCCCC1>>O=C(Cc1ccc(Br)cc1)NC1CCCCC1",
    # halogenation
    "c1ccc2[nH]ccc2c1.O=C1CCC(=O)N1Br>>Brc1c[nH]c2ccccc12",
    "Cc1ccc(O)cc1.O=C1CCC(=O)N1Cl>>Cc1ccc(O)c(Cl)c1",
    "OCc1ccc(Cl)cc1.O=S(Cl)Cl>>ClCc1ccc(Cl)cc1",
    "OCCc1ccccc1.BrP(Br)Br>>BrCCc1ccccc1",
    "CC(=O)c1ccc(Cl)cc1.BrBr>>O=C(CBr)c1ccc(Cl)cc1",
    # reductive amination, Grignard
    "O=Cc1ccc(Cl)cc1.NC1CCOCC1>>Clc1ccc(CNC2CCOCC2)cc1",
    "O=Cc1cccc(Br)c1.CNC>>CN(C)Cc1cccc(Br)c1",
    "Brc1ccc(Cl)cc1.O=C1CCCC1>>OC1(c2ccc(Cl)cc2)CCCC1",
]

# Reactions without Cl or Br: the language-modelling score (masked-token accuracy) of every candidate edit.
NEUTRAL_REACTIONS = [
    "CC(=O)O.Nc1ccccc1>>CC(=O)Nc1ccccc1",
    "COC(=O)c1ccc(O)cc1>>O=C(O)c1ccc(O)cc1",
    "O=Cc1ccccc1.NCc1ccccc1>>c1ccc(CNCc2ccccc2)cc1",
    "CC(C)(C)OC(=O)N1CCC(O)CC1>>OC1CCNCC1",
    "Nc1ccccc1.O=C(O)c1ccccn1>>O=C(Nc1ccccc1)c1ccccn1",
    "OCc1ccccc1.CC(=O)OC(C)=O>>CC(=O)OCc1ccccc1",
    "O=[N+]([O-])c1ccc(C)cc1>>Cc1ccc(N)cc1",
    "COc1ccc(C=O)cc1>>COc1ccc(CO)cc1",
    "Oc1ccccc1.CI>>COc1ccccc1",
    "C1CCNCC1.O=C(O)c1ccc(C)cc1>>Cc1ccc(C(=O)N2CCCCC2)cc1",
    "CC(=O)c1ccccc1>>CC(O)c1ccccc1",
    "N#Cc1ccccc1>>NCc1ccccc1",
    "COC(=O)c1ccc(N)cc1.CC(=O)OC(C)=O>>COC(=O)c1ccc(NC(C)=O)cc1",
    "OB(O)c1ccccc1.Ic1ccc(C)cc1>>Cc1ccc(-c2ccccc2)cc1",
    "CC(C)(C)OC(=O)OC(=O)OC(C)(C)C.NCc1ccccc1>>CC(C)(C)OC(=O)NCc1ccccc1",
    "O=C(O)c1ccccc1O.CO>>COC(=O)c1ccccc1O",
    "CCOC(=O)c1ccc(N)cc1>>Nc1ccc(CO)cc1",
    "O=C(O)c1ccc(F)cc1.NC1CC1>>O=C(NC1CC1)c1ccc(F)cc1",
]

TOKEN = re.compile(SMILES_PATTERN)


def swap_halogens(smiles: str) -> str:
    """The reaction with every Cl and Br exchanged (tokens only; bracket atoms such as [Cl-] stay)."""
    return "".join(OTHER.get(t, t) for t in TOKEN.findall(smiles))


def mask_rows(smiles: str, reaction: int) -> list[dict]:
    """One row per Cl/Br token of the reaction: that token masked, the other halogen as the alternative."""
    rows = []
    for match in TOKEN.finditer(smiles):
        token = match.group()
        if token in WORD:
            rows.append(dict(masked=smiles[:match.start()] + "[MASK]" + smiles[match.end():], factual=token,
                             alternative=OTHER[token], factual_class=WORD[token], alternative_class=WORD[OTHER[token]],
                             reaction=reaction))
    return rows


def neutral_rows(rows: list[dict], count: int, seed: int = 0) -> list[dict]:
    """Identity rows (factual == alternative, label 0): a random C, c, N, O or n of a test reaction masked."""
    rng = random.Random(seed)
    texts = sorted({r["masked"].replace("[MASK]", r["factual"]) for r in rows})
    out = []
    for smiles in rng.sample(texts, min(count, len(texts))):
        match = rng.choice([m for m in TOKEN.finditer(smiles) if m.group() in {"C", "c", "N", "O", "n"}])
        out.append(dict(masked=smiles[:match.start()] + "[MASK]" + smiles[match.end():], factual=match.group(),
                        alternative=match.group(), factual_class=CLASSES[0], alternative_class=CLASSES[0]))
    return out


def splits(seed: int = 0, fractions=(0.7, 0.15)) -> dict[str, list[dict]]:
    """Rows split by reaction (a reaction and its twin always in the same split)."""
    order = list(range(len(REACTIONS)))
    random.Random(seed).shuffle(order)
    n_train, n_val = round(fractions[0] * len(order)), round(fractions[1] * len(order))
    parts = {"train": order[:n_train], "validation": order[n_train:n_train + n_val], "test": order[n_train + n_val:]}
    return {name: [row for i in ids for smiles in (REACTIONS[i], swap_halogens(REACTIONS[i]))
                   for row in mask_rows(smiles, i)] for name, ids in parts.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/chemistry")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--learning-rate", type=float, default=1e-6)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = Path(args.out)

    data = splits(seed=args.seed)
    print({name: len(rows) for name, rows in data.items()})
    base, tokenizer = load_rxnmapper_albert()
    config = GradiendConfig(feature_classes=CLASSES, init_seed=args.seed)  # default: every backbone weight
    model = get_gradiend_model(base, config)
    model.print_trainable_parameters()
    trainer = GradiendTrainer(
        model=model,
        args=GradiendTrainingArguments(output_dir=str(out / "training"), learning_rate=args.learning_rate,
                                       max_steps=args.steps, eval_steps=25, save_steps=25, logging_steps=25,
                                       per_device_train_batch_size=4, seed=args.seed),
        train_dataset=data["train"], eval_dataset=data["validation"], processing_class=tokenizer,
    )
    trainer.train()

    test = data["test"]
    encoder = evaluate_encoder(model, test + neutral_rows(test, 16, seed=args.seed), tokenizer, neutral=0,
                               progress=False)
    print("encoder (held-out reactions):", json.dumps(encoder.summary(), indent=1))
    print(encoder.by_class[["count", "mean", "std"]].to_string())

    decoder = evaluate_decoder(model, test, tokenizer, neutral_texts=NEUTRAL_REACTIONS, progress=False)
    edits = {goal: decoder.best(goal) for goal in ("balance", "chlorine", "bromine")}
    for goal, edit in edits.items():
        m = edit.metrics
        print(f"{goal:9s} ff={edit.feature_factor:+.0f} lr={edit.learning_rate:g}  "
              f"P(Cl)={m['probabilities']['chlorine']:.3f} "
              f"P(Br)={m['probabilities']['bromine']:.3f}  (base {m['base_probabilities']['chlorine']:.3f} / "
              f"{m['base_probabilities']['bromine']:.3f})  masked-atom accuracy {m['lms']:.3f} "
              f"(base {m['base_lms']:.3f})")
    out.mkdir(parents=True, exist_ok=True)
    decoder.grid.to_csv(out / "decoder_grid.csv", index=False)
    encoder.frame.to_csv(out / "encoder_rows.csv", index=False)
    model.record_edit(edits["balance"])  # stored in the adapter: merge_and_unload() / PEFT loading use it
    model.save_pretrained(out / "adapter")
    print(f"done: {out}")


if __name__ == "__main__":
    main()
