"""Model cards for adapters (and, later, merged models), written with huggingface_hub's ModelCard API."""

from __future__ import annotations

from importlib import resources
from typing import Any, Optional

from huggingface_hub import ModelCard, ModelCardData

from .config import GradiendConfig


def template_path(name: str) -> str:
    return str(resources.files("gradiend_hf.model_cards").joinpath(name))


def adapter_card(
    config: GradiendConfig,
    num_entries: int,
    repo_id: Optional[str] = None,
    training_data: Optional[str] = None,
    encoder_correlation: Optional[float] = None,
    license: str = "apache-2.0",
) -> ModelCard:
    """The README.md of a saved adapter: metadata for the Hub plus what the feature neuron means."""
    data = ModelCardData(
        library_name="gradiend_hf",
        base_model=config.base_model_name_or_path,
        license=license,
        tags=["gradiend", "peft", *(f"feature:{c}" for c in config.feature_classes)],
    )
    fields: dict[str, Any] = dict(
        feature_classes=config.feature_classes,
        base_model=config.base_model_name_or_path,
        objective=config.objective,
        source=config.source,
        target=config.target,
        num_entries=num_entries,
        feature_factor=config.feature_factor,
        learning_rate=config.learning_rate,
        encoder_correlation=encoder_correlation,
        training_data=training_data,
        repo_id=repo_id,
    )
    return ModelCard.from_template(data, template_path=template_path("adapter.md"), **fields)
