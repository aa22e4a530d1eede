"""`make bench`: the performance suite of issue 8, one benchmark after the other (never two at once: on a 2-core
machine they would time each other), then benchmarks/results/latest.md with every table and the machine.

Each benchmark checks that its fast path computes the same numbers as the slow path and exits non-zero otherwise;
this script stops at the first failure. Run on an otherwise idle machine.

Run: .venv/bin/python benchmarks/run_all.py [--only training per_row decoder_grid data_creation sharded_memory]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
SUITE = {
    "training": "Training step time and memory (items 1, 2)",
    "per_row": "Per-row encodings: forward-mode vs one backward pass per row (item 3)",
    "decoder_grid": "Decoder grid: in-place apply/revert vs a deep copy per candidate (item 4)",
    "data_creation": "Data creation throughput through the spaCy filters (item 5)",
    "sharded_memory": "Sharded training: memory per process at N = 1, 2, 4, 8 (gloo on CPU)",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=list(SUITE), default=list(SUITE))
    args = parser.parse_args()
    sections, seconds = [], {}
    for name in args.only:
        print(f"\n## {SUITE[name]}: benchmarks/{name}.py", flush=True)
        start = time.perf_counter()
        done = subprocess.run([sys.executable, str(HERE / f"{name}.py")])
        seconds[name] = time.perf_counter() - start
        if done.returncode:
            raise SystemExit(f"benchmarks/{name}.py failed (exit {done.returncode}); no summary written.")
    for name in SUITE:
        table = RESULTS / f"{name}.md"
        if table.exists():
            sections.append(f"### {SUITE[name]}\n\n`.venv/bin/python benchmarks/{name}.py`\n\n"
                            f"{table.read_text().strip()}\n")
    machine = json.loads((RESULTS / f"{args.only[0]}.json").read_text())["machine"]
    header = (f"Machine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']} "
              f"({machine['threads']} threads), Python {machine['python']}. Suite time: " +
              ", ".join(f"{k} {v / 60:.1f} min" for k, v in seconds.items()) + ".\n")
    (RESULTS / "latest.md").write_text(header + "\n" + "\n".join(sections))
    print(f"\nwrote {RESULTS / 'latest.md'}")


if __name__ == "__main__":
    main()
