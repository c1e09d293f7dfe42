"""Test-session setup: Triton kernels run under its interpreter unless a CUDA GPU is present."""

from __future__ import annotations

import importlib.util
import os


def _has_cuda() -> bool:
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return torch.cuda.is_available()


# Triton reads TRITON_INTERPRET when it is imported, so this must happen before any test imports it.
if not _has_cuda():
    os.environ.setdefault("TRITON_INTERPRET", "1")
