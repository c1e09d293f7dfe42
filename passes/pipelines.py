"""The default pipeline of each target, in one place: read top to bottom, the story of the compiler."""

from __future__ import annotations

DEFAULT_PIPELINES: dict[str, str] = {
    # The reference target interprets the IR after clean-up, with block maps so that attention
    # visits only the tiles its mask allows (the block-sparse semantics every backend follows).
    "reference": "canonicalize,recognize-attention,sparsify-attention,cse,dce",
}


def default_pipeline(target: str) -> str:
    """The pipeline string for `target`; KeyError for a target without one."""
    return DEFAULT_PIPELINES[target]
