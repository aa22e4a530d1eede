"""Model cards (huggingface_hub's ModelCard API) for GRADIEND adapters and for models rewritten by GRADIEND.

Two cards, both Jinja templates in `model_cards/` (shipped as `gradiend_hf.model_cards`):
- `adapter.md`: the README.md of a saved GRADIEND adapter (written by `GradiendModel.save_pretrained`);
- `merged.md`: the README.md of a plain transformers model rewritten by GRADIEND (`merge_and_unload`).

Both read the figures that decoder evaluation stores in `GradiendConfig.evaluation` (every key optional):
`goal, feature_factor, learning_rate, lms, base_lms, perplexity, base_perplexity, probabilities, base_probabilities,
encoder_correlation, training_rows, training_data`. A missing figure renders as "not evaluated". Uploading is hub.py's.

The adapter card a GradiendTrainer writes (`save_model`, `push_to_hub`, `create_model_card`) also carries the user's
tags and datasets in its metadata and a "Training results" table (the best evaluation, the convergence verdict);
`training_results_section` renders it.
"""

from __future__ import annotations

import math
import os
import re
from importlib import resources
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence, Union

from huggingface_hub import ModelCard, ModelCardData

from .config import GradiendConfig

if TYPE_CHECKING:
    from .edit import Edit

NOT_EVALUATED = "not evaluated"
REPO_PLACEHOLDER = "PATH_OR_REPO_ID"  # what a card saved without a repo id shows where the repo id goes
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?\Z")  # a Hub repo id (match)


def hub_model_id(name_or_path: Optional[str]) -> Optional[str]:
    """`name_or_path` if it can be a Hub model id, None for a local path (absolute, relative, or an existing folder):
    the Hub's `base_model` metadata must name a Hub repo, and a local path there leaks a directory name."""
    if not name_or_path or not HUB_ID.match(name_or_path) or os.path.exists(name_or_path):
        return None
    return name_or_path


def card_for_repo(text: str, repo_id: str) -> str:
    """A saved card (README.md) made ready for `repo_id`: the repo id where the loading code shows the placeholder,
    and no local path as `base_model` in the metadata."""
    card = ModelCard(text)
    card.text = card.text.replace(REPO_PLACEHOLDER, repo_id)
    if card.data.base_model is not None and hub_model_id(card.data.base_model) is None:
        card.data.base_model = None
        card.data.base_model_relation = None
    return str(card)
# Figures that do not depend on which edit was chosen (they stay valid when another edit is merged).
EDIT_INDEPENDENT = (
    "encoder_correlation", "training_rows", "training_data", "base_lms", "base_perplexity", "base_probabilities"
)
# Figures measured on the edited model: they belong to the evaluation's (feature_factor, learning_rate).
EDIT_DEPENDENT = ("goal", "feature_factor", "learning_rate", "lms", "perplexity", "probabilities")
EVALUATION_KEYS = EDIT_INDEPENDENT + EDIT_DEPENDENT


def template_path(name: str) -> str:
    return str(resources.files("gradiend_hf.model_cards").joinpath(name))


# --- formatting --------------------------------------------------------------------------------------------------
def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value))


def _number(value: float, sign: str = "") -> str:
    return f"{value:{sign},.0f}" if abs(value) >= 1e4 else f"{value:{sign}.4g}"


def format_figure(value: Any) -> str:
    """A measured figure, 4 significant digits (0.8123, 1.234e-05, 37.41, 12,346); missing reads 'not evaluated'."""
    if value is None:
        return NOT_EVALUATED
    if _is_number(value):
        return _number(float(value))
    return str(value)


def format_change(before: Any, after: Any) -> str:
    if _is_number(before) and _is_number(after):
        return _number(float(after) - float(before), "+")
    return ""


def format_edit_value(value: Any) -> str:
    """An edit parameter, exactly (shortest float repr) so that it can be copied into merge_and_unload."""
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(format_edit_value(v) for v in value) + "]"
    if _is_number(value):
        return repr(float(value))
    return str(value)


def describe_goal(goal: Optional[str], feature_classes: Sequence[str]) -> Optional[str]:
    """Plain words for an edit goal: 'balance', '<class>' (strengthen) or '-<class>' (weaken)."""
    if not goal:
        return None
    first, second = feature_classes
    if goal == "balance":
        return f'balance "{first}" and "{second}" (debias: neither class is preferred)'
    if goal in feature_classes:
        other = second if goal == first else first
        return f'strengthen "{goal}" (prefer {goal} over {other})'
    if goal.startswith("-") and goal[1:] in feature_classes:
        return f'weaken "{goal[1:]}"'
    return goal


def _same_edit(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        a_list = list(a) if isinstance(a, (list, tuple)) else [a]
        b_list = list(b) if isinstance(b, (list, tuple)) else [b]
        return len(a_list) == len(b_list) and all(_same_edit(x, y) for x, y in zip(a_list, b_list))
    return _is_number(a) and _is_number(b) and math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)


# --- what both cards show ----------------------------------------------------------------------------------------
def template_fields(
    config: GradiendConfig,
    *,
    edit: Optional["Edit"] = None,
    training_data: Optional[str] = None,
    encoder_correlation: Optional[float] = None,
    repo_id: Optional[str] = None,
) -> dict[str, Any]:
    """The template variables shared by the adapter and merged cards, every figure already formatted.

    The chosen edit is `edit` if given, else the one stored in the config (what `merge_and_unload()` applies), else
    the evaluation's. Figures measured on an edited model are only shown for the edit they were measured with.
    """
    evaluation: dict[str, Any] = {k: v for k, v in (config.evaluation or {}).items() if k in EVALUATION_KEYS}
    if edit is not None:
        feature_factor, learning_rate, goal = edit.feature_factor, edit.learning_rate, edit.goal
        extra = {k: v for k, v in (edit.metrics or {}).items() if k in EVALUATION_KEYS}
    elif config.feature_factor is not None:
        feature_factor, learning_rate, goal, extra = config.feature_factor, config.learning_rate, None, {}
    else:
        feature_factor, learning_rate, goal, extra = (
            evaluation.get("feature_factor"), evaluation.get("learning_rate"), None, {}
        )
    measured_for_this_edit = feature_factor is not None and (
        ("feature_factor" not in evaluation and "learning_rate" not in evaluation)
        or (
            _same_edit(evaluation.get("feature_factor"), feature_factor)
            and _same_edit(evaluation.get("learning_rate"), learning_rate)
        )
    )
    if not measured_for_this_edit:
        evaluation = {k: v for k, v in evaluation.items() if k in EDIT_INDEPENDENT}
    evaluation.update(extra)
    goal = goal if goal is not None else evaluation.get("goal")

    classes = list(config.feature_classes)
    probabilities = dict(evaluation.get("probabilities") or {})
    base_probabilities = dict(evaluation.get("base_probabilities") or {})
    prob_classes = classes + [c for c in {**base_probabilities, **probabilities} if c not in classes]
    metric_rows = [
        ("language modelling score (LMS)", evaluation.get("base_lms"), evaluation.get("lms")),
        ("perplexity", evaluation.get("base_perplexity"), evaluation.get("perplexity")),
    ] + [(f"P({c})", base_probabilities.get(c), probabilities.get(c)) for c in prob_classes]
    rows = [
        dict(name=name, before=format_figure(before), after=format_figure(after), change=format_change(before, after))
        for name, before, after in metric_rows
    ]
    correlation = encoder_correlation if encoder_correlation is not None else evaluation.get("encoder_correlation")
    rows_used = evaluation.get("training_rows")
    objective = config.objective
    return dict(
        feature_classes=classes,
        base_model=config.base_model_name_or_path,
        objective=objective,
        auto_class={"masked_lm": "AutoModelForMaskedLM", "causal_lm": "AutoModelForCausalLM"}.get(
            objective, "AutoModelForCausalLM"
        ),
        source=config.source,
        target=config.target,
        repo_id=repo_id,
        has_edit=feature_factor is not None,
        feature_factor=format_edit_value(feature_factor) if feature_factor is not None else None,
        learning_rate=format_edit_value(learning_rate) if learning_rate is not None else None,
        goal=goal,
        goal_text=describe_goal(goal, classes) or NOT_EVALUATED,
        evaluated=any(r["before"] != NOT_EVALUATED or r["after"] != NOT_EVALUATED for r in rows),
        figures=rows[:2],
        probabilities=rows[2:],
        encoder_correlation=format_figure(correlation),
        training_data=training_data or evaluation.get("training_data"),
        training_rows=f"{int(rows_used):,}" if _is_number(rows_used) else None,
    )


def _tags(config: GradiendConfig, *extra: str) -> list[str]:
    tags = ["gradiend", *(f"feature:{c}" for c in config.feature_classes), *extra]
    return list(dict.fromkeys(tags))  # user tags may repeat ours


def _as_list(value: Union[str, Sequence[str], None]) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else [str(v) for v in value]


RESULTS_HEADING = "## Training results"


def training_results_section(results: Mapping[str, Any]) -> str:
    """A markdown table of training figures (name -> value; numbers with 4 significant digits, lists joined)."""
    lines = [RESULTS_HEADING, "", "| | |", "|---|---|"]
    for name, value in results.items():
        if isinstance(value, (list, tuple)):
            shown = "; ".join(str(v) for v in value) or "none"
        elif isinstance(value, bool):
            shown = "yes" if value else "no"
        else:
            shown = format_figure(value)
        lines.append(f"| {name} | {shown.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def _insert_section(text: str, section: str, before: str = "## How to load") -> str:
    at = text.find(before)
    return text + "\n" + section if at < 0 else text[:at] + section + "\n" + text[at:]


def chosen_edit_rows(edits: Mapping[str, "Edit"], feature_classes: Sequence[str]) -> list[dict[str, str]]:
    """One row per goal's chosen edit: what it does, its values, and where it was selected."""
    return [
        dict(goal=describe_goal(goal, feature_classes) or goal, feature_factor=format_edit_value(edit.feature_factor),
             learning_rate=format_edit_value(edit.learning_rate),
             selected_in=str((edit.metrics or {}).get("selected_in", "held-out rows")))
        for goal, edit in edits.items()
    ]


def debiased(edit_metrics: Mapping[str, Any], feature_classes: Sequence[str]) -> bool:
    """A balance edit counts as debiasing only where it was measured to be: in neutral contexts the mean |log P ratio|
    must fall, or (without contexts) |log P(first)/P(second)| on the recorded rows."""
    after, before = edit_metrics.get("context_abs_log_ratio"), edit_metrics.get("base_context_abs_log_ratio")
    if _is_number(after) and _is_number(before):
        return after < before
    first, second = feature_classes
    now, base = edit_metrics.get("probabilities") or {}, edit_metrics.get("base_probabilities") or {}
    values = [now.get(first), now.get(second), base.get(first), base.get(second)]
    if not all(_is_number(v) and v > 0 for v in values):
        return False
    return abs(math.log(values[0] / values[1])) < abs(math.log(values[2] / values[3]))


# --- cards -------------------------------------------------------------------------------------------------------
def adapter_card(
    config: GradiendConfig,
    num_entries: int,
    repo_id: Optional[str] = None,
    training_data: Optional[str] = None,
    encoder_correlation: Optional[float] = None,
    license: Optional[str] = "apache-2.0",
    *,
    tags: Union[str, Sequence[str], None] = None,
    datasets: Union[str, Sequence[str], None] = None,
    language: Union[str, Sequence[str], None] = None,
    training_results: Optional[Mapping[str, Any]] = None,
    edits: Optional[Mapping[str, "Edit"]] = None,
) -> ModelCard:
    """The README.md of a saved adapter: Hub metadata, what the feature neuron means, the stored edit and its
    figures. `tags`/`datasets`/`language` go into the metadata beside GRADIEND's own tags; `training_results` (name ->
    value) adds a "Training results" table; `edits` (goal -> Edit, e.g. the CLI's evaluation) lists every chosen
    edit."""
    data = ModelCardData(
        library_name="gradiend_hf",
        base_model=hub_model_id(config.base_model_name_or_path),
        base_model_relation="adapter" if hub_model_id(config.base_model_name_or_path) else None,
        license=license or "apache-2.0",
        tags=_tags(config, "peft", *_as_list(tags)),
        datasets=_as_list(datasets) or None,
        language=_as_list(language) or None,
    )
    fields = template_fields(
        config, training_data=training_data, encoder_correlation=encoder_correlation, repo_id=repo_id
    )
    fields.update(num_entries=f"{int(num_entries):,}", latent_dim=config.latent_dim,
                  chosen_edits=chosen_edit_rows(edits or {}, config.feature_classes))
    card = ModelCard.from_template(data, template_path=template_path("adapter.md"), **fields)
    if training_results:
        card.text = _insert_section(card.text, training_results_section(training_results))
    return card


def merged_card(
    config: GradiendConfig,
    repo_id: Optional[str] = None,
    license: str = "apache-2.0",
    *,
    edit: Optional["Edit"] = None,
    with_tokenizer: bool = True,
    training_data: Optional[str] = None,
    encoder_correlation: Optional[float] = None,
    benchmarks: Optional[str] = None,
) -> ModelCard:
    """The README.md of a model edited by GRADIEND: an ordinary transformers model, loadable without gradiend_hf.

    `config` is the adapter's GradiendConfig (`model.gradiend_config`); `edit` is the merged edit when it is not the
    one stored in the config. `with_tokenizer=False` tells readers to take the tokenizer from the base model.
    `benchmarks`: a markdown table of the public bias benchmarks, the base model vs this model (the job's report
    renders it from its results).
    """
    fields = template_fields(
        config, edit=edit, training_data=training_data, encoder_correlation=encoder_correlation, repo_id=repo_id
    )
    if not fields["has_edit"]:
        raise ValueError(
            "merged_card needs the merged edit: pass edit= (e.g. evaluate_decoder(...).best('balance')) or a config "
            "with feature_factor and learning_rate."
        )
    pipeline = {"masked_lm": "fill-mask", "causal_lm": "text-generation"}.get(config.objective)
    data = ModelCardData(
        library_name="transformers",
        base_model=hub_model_id(config.base_model_name_or_path),
        base_model_relation="finetune" if hub_model_id(config.base_model_name_or_path) else None,
        license=license,
        pipeline_tag=pipeline,
        tags=_tags(config, "debiased" if fields["goal"] == "balance" and debiased(
            (edit.metrics if edit is not None else config.evaluation) or {}, config.feature_classes) else "edited"),
    )
    fields.update(with_tokenizer=with_tokenizer, benchmark_table=benchmarks)
    return ModelCard.from_template(data, template_path=template_path("merged.md"), **fields)

