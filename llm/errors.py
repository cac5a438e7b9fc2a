"""The one base class of the problems a user can fix.

Every specific error (`ConfigError`, `CheckpointError`, `IndexedDatasetError`, ...) subclasses
`LLMError`; its message names what is wrong and the fix. Entry scripts catch `LLMError` alone and
turn it into one `error: ...` line and exit status 1. Anything else is a bug and keeps its
traceback. Nothing in `llm/` raises SystemExit or calls exit().
"""

from __future__ import annotations


class LLMError(Exception):
    """A user mistake or a damaged input (config, data, checkpoint, launch environment)."""
