"""Which installed releases work together, and a clear error where they do not.

transformers >= 5.24 still loads adapters with peft 0.21 (`AutoModel*.from_pretrained(adapter_dir)`,
`model.load_adapter`), but manages them (`set_adapter`, `disable_adapters`/`enable_adapters`, `active_adapters`,
`add_adapter`, `delete_adapter`, and `save_pretrained` of a model holding one) only with peft >= 0.22, which is not
released yet: its own error then only says "please use a version >= 0.22.0". `explain_adapter_api_blocker()` (called
at import) makes that same refusal name both installed versions and the ways out. Nothing changes where the versions
fit: this is an error message, not a workaround.
"""

from __future__ import annotations

from typing import Optional

from packaging.version import Version

TESTED_LOCK = "requirements/lock.txt"


def adapter_api_blocker() -> Optional[str]:
    """Why transformers' adapter API refuses the installed peft (for all but loading), or None if it does not."""
    import importlib.metadata

    import transformers

    try:
        from transformers.integrations.peft import MIN_PEFT_VERSION
    except ImportError:  # older transformers: no minimum declared there
        return None
    installed = importlib.metadata.version("peft")  # what transformers' own check reads
    if Version(installed) >= Version(MIN_PEFT_VERSION):
        return None
    return (
        f"transformers {transformers.__version__} manages adapters (set_adapter, disable_adapters, enable_adapters, "
        "active_adapters, add_adapter, delete_adapter, save_pretrained of a model holding one) only with "
        f"peft >= {MIN_PEFT_VERSION}, but peft {installed} is installed. Loading still works, and so do "
        "gradiend_hf.GradiendModel.from_pretrained(base, path) and peft.PeftModel.from_pretrained(base, path) with all "
        "their methods; a merged model loads anywhere. For the rest of transformers' adapter API, install the tested "
        f"versions (pip install 'transformers<5.24' 'peft>=0.21', as in gradiend_hf's {TESTED_LOCK}) or "
        f"peft >= {MIN_PEFT_VERSION} once it is released."
    )


def explain_adapter_api_blocker() -> None:
    """Where transformers would refuse the installed peft, make its refusal carry adapter_api_blocker()'s message (the
    same ValueError at the same place, with transformers' own error chained). Idempotent."""
    if adapter_api_blocker() is None:
        return
    import transformers.integrations.peft as integration

    original = integration.check_peft_version
    if getattr(original, "explains_blocker", False):
        return

    def check_peft_version(min_version: str) -> None:
        try:
            original(min_version=min_version)
        except ValueError as error:
            raise ValueError(adapter_api_blocker() or str(error)) from error

    check_peft_version.explains_blocker = True
    integration.check_peft_version = check_peft_version
