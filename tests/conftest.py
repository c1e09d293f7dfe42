"""Test-session setup: Triton kernels run under its interpreter unless a CUDA GPU is present; a fresh kernel cache;
Dynamo's caches cleared around each test."""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest


def _has_cuda() -> bool:
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return torch.cuda.is_available()


# Triton reads TRITON_INTERPRET when it is imported, so this must happen before any test imports it.
if not _has_cuda():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Compiled kernels are cached on disk; tests start from an empty cache of their own so a stale entry from
# another checkout can never stand in for a compile under test.
if "SPARSA_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    _cache = tempfile.mkdtemp(prefix="sparsa-test-cache-")
    os.environ["SPARSA_CACHE_DIR"] = _cache
    atexit.register(shutil.rmtree, _cache, True)


def _reset_dynamo() -> None:
    dynamo = sys.modules.get("torch._dynamo")  # only where a test has imported it
    if dynamo is not None:
        dynamo.reset()


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch: Dynamo keeps compiled frames (of shared transformers helpers too) across
    tests, and past its recompile limit it runs a frame eagerly without calling the backend at all."""
    _reset_dynamo()
    yield
    _reset_dynamo()
