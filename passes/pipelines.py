"""The default pipeline of each target, in one place: read top to bottom, the story of the compiler."""

from __future__ import annotations

DEFAULT_PIPELINES: dict[str, str] = {
    # The reference target interprets the IR as the frontend wrote it, after clean-up.
    "reference": "canonicalize,cse,dce",
}


def default_pipeline(target: str) -> str:
    """The pipeline string for `target`; KeyError for a target without one."""
    return DEFAULT_PIPELINES[target]
