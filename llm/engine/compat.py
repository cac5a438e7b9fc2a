"""The DeepSpeed versions llm was tested with.

`llm.engine.internals` reads DeepSpeed's private internals (file naming, ZeRO partition layouts,
fragment mappings, the checkpoint writer), which change between releases without notice. Importing it
with another DeepSpeed version fails at once with this message rather than misreading a checkpoint
weeks into a run. LLM_ALLOW_UNTESTED_DEEPSPEED=1 downgrades it to a warning (at your own risk).
"""

from __future__ import annotations

import logging
import os
from importlib.metadata import PackageNotFoundError, version

from llm.errors import LLMError

TESTED_DEEPSPEED = ("0.19.8",)  # every version the test suite ran on; pyproject.toml pins the same


class UntestedDeepSpeedError(LLMError, ImportError):
    """The installed DeepSpeed is not one llm's DeepSpeed seam was tested with."""


def require_tested_deepspeed(installed: str | None = None) -> None:
    try:
        found = installed or version("deepspeed")
    except PackageNotFoundError:
        raise UntestedDeepSpeedError(
            "DeepSpeed is not installed: pip install -e . installs the tested version"
        ) from None
    if found in TESTED_DEEPSPEED:
        return
    message = (
        f"DeepSpeed {found} is installed, but llm's DeepSpeed seam was tested only with DeepSpeed "
        f"{', '.join(TESTED_DEEPSPEED)}: pip install 'deepspeed=={TESTED_DEEPSPEED[-1]}' (or set "
        "LLM_ALLOW_UNTESTED_DEEPSPEED=1 to try it anyway)"
    )
    if os.environ.get("LLM_ALLOW_UNTESTED_DEEPSPEED") == "1":
        logging.getLogger("llm").warning("%s", message)
        return
    raise UntestedDeepSpeedError(message)
