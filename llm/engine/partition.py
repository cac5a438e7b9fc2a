"""DeepSpeed's own pipeline stage partitioners, so that a plan cuts stages exactly as PipelineModule
does."""

from __future__ import annotations

import contextlib
import io
import logging
import sys
from typing import Any


def deepspeed_partitioners() -> Any:
    """DeepSpeed's own stage partitioners (so the plan cuts stages exactly as PipelineModule does),
    imported without DeepSpeed's accelerator banner on stdout (`plan.py --json` prints JSON only)."""
    if "deepspeed" in sys.modules:
        from deepspeed.runtime import utils
    else:
        with contextlib.redirect_stdout(io.StringIO()):
            from deepspeed.runtime import utils
        for handler in logging.getLogger("DeepSpeed").handlers:  # created during the redirect
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                handler.setStream(sys.stdout)
    return utils
