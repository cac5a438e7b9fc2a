"""The one base class of the problems a user can fix.

Every specific error (`ConfigError`, `CheckpointError`, `IndexedDatasetError`, ...) subclasses
`LLMError`; its message names what is wrong and the fix. Entry scripts catch `LLMError` alone and
turn it into one `error: ...` line and exit status 1. Anything else is a bug and keeps its
traceback. Nothing in `llm/` raises SystemExit or calls exit().
"""

from __future__ import annotations


class LLMError(Exception):
    """A user mistake or a damaged input (config, data, checkpoint, launch environment)."""

    # Set on an error that every rank raises with the same message (a mistake in the config every rank
    # read), or that echoes rank 0's: entry scripts print it on rank 0 only, not once per process.
    rank_zero_only: bool = False


def on_every_rank(error: LLMError) -> LLMError:
    """Marks `error` as raised alike by every rank (printed once, by rank 0)."""
    error.rank_zero_only = True
    return error
