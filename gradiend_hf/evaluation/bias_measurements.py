"""Where the local Hugging Face `evaluate` measurement modules live: `evaluate.load(measurement_path("crows_pairs"))`
works offline (the modules only do arithmetic on the scores the benchmark functions produce)."""

from __future__ import annotations

from pathlib import Path

MEASUREMENTS = ("bbq", "crows_pairs", "stereoset", "winogender")


def measurement_path(name: str) -> str:
    """The folder of a measurement module, for `evaluate.load`."""
    if name not in MEASUREMENTS:
        raise ValueError(f"Unknown measurement {name!r}; choose from {list(MEASUREMENTS)}.")
    path = Path(__file__).parent / "measurements" / name
    if not (path / f"{name}.py").is_file():
        raise FileNotFoundError(f"{path / (name + '.py')} is missing: the package was installed without its "
                                "measurement modules (package-data 'measurements/*/*.py').")
    return str(path)
