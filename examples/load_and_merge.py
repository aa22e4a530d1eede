"""Load a saved GRADIEND adapter two ways, merge it, and check that both give the same model.

(1) `GradiendModel.from_pretrained(base, adapter).merge_and_unload()`; (2) PEFT: `PeftModel.from_pretrained(base,
adapter).merge_and_unload()` (works after `import gradiend_hf`, which registers the adapter type). Both apply
theta + lr * dec(ff) with the edit stored in the adapter (or the one given on the command line), so their outputs
agree; the merged model is then saved and reloaded with plain transformers, no gradiend_hf needed.

    .venv/bin/python examples/chemistry_albert.py --out runs/chemistry      # writes runs/chemistry/adapter
    .venv/bin/python examples/load_and_merge.py --adapter runs/chemistry/adapter
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

from gradiend_hf import GradiendModel, offline

# base model recorded in the adapter -> (loader, a probe input, class to reload a merged folder with)
BASES = {
    offline.RXN_NAME: (offline.load_rxnmapper_albert, "Brc1ccc([MASK])cc1.OB(O)c1ccccc1>>[MASK]c1ccc(-c2ccccc2)cc1",
                       AutoModelForMaskedLM),
    offline.MINILM_NAME: (offline.load_minilm_mlm, "[MASK] said that [MASK] would come back tomorrow.",
                          AutoModelForMaskedLM),
    offline.HUB_ID: (offline.load_smollm2, "The nurse said that", AutoModelForCausalLM),
}


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", default="runs/chemistry/adapter")
    parser.add_argument("--feature-factor", type=float, default=None, help="edit to use if the adapter stores none")
    parser.add_argument("--learning-rate", type=float, default=None)
    args = parser.parse_args()
    adapter_config = json.loads((Path(args.adapter) / "adapter_config.json").read_text())
    base_name = adapter_config["base_model_name_or_path"]
    load, probe, auto_class = BASES[base_name]
    edit = {}
    if args.feature_factor is not None:
        edit = {"feature_factor": args.feature_factor, "learning_rate": args.learning_rate}
    elif adapter_config.get("learning_rate") is None:
        raise SystemExit("The adapter stores no edit; pass --feature-factor and --learning-rate.")
    print(f"adapter {args.adapter} on {base_name}; edit: "
          f"{edit or {k: adapter_config[k] for k in ('feature_factor', 'learning_rate')}}")

    base, tokenizer = load()
    inputs = tokenizer(probe, return_tensors="pt")
    before = logits(base, inputs)

    # (1) GradiendModel: load, merge (in place), get the plain transformers model back
    merged = GradiendModel.from_pretrained(base, args.adapter).merge_and_unload(**edit)
    out_gradiend = logits(merged, inputs)

    # (2) PEFT: a fresh base, the same adapter through PeftModel, merged the PEFT way
    fresh, _ = load()
    peft_model = PeftModel.from_pretrained(fresh, args.adapter, **edit)
    out_peft_unmerged = logits(peft_model, inputs)
    out_peft = logits(peft_model.merge_and_unload(), inputs)

    # (3) the merged model is an ordinary checkpoint
    with tempfile.TemporaryDirectory() as folder:
        merged.save_pretrained(folder)
        reloaded = auto_class.from_pretrained(folder, use_safetensors=True).eval()
        out_reloaded = logits(reloaded, inputs)

    gap = lambda a, b: float((a - b).abs().max())
    print(f"max |logit change| of the edit:            {gap(out_gradiend, before):.4g}")
    print(f"GradiendModel merge vs PEFT merge:         {gap(out_gradiend, out_peft):.3g}")
    print(f"GradiendModel merge vs PEFT unmerged:      {gap(out_gradiend, out_peft_unmerged):.3g}")
    print(f"merged vs reloaded with plain transformers: {gap(out_gradiend, out_reloaded):.3g}")
    assert torch.allclose(out_gradiend, out_peft, atol=1e-5) and torch.allclose(out_gradiend, out_reloaded, atol=1e-5)
    print("equal outputs")


if __name__ == "__main__":
    main()
