"""The triton target: generated Triton kernels and a host launcher per function, on NVIDIA GPUs (or in
Triton's interpreter without one, slowly, for tests)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sparsa.backends.base import Backend, Executable
from sparsa.ir.core import Operation
from sparsa.passes.pipelines import sparse_pipeline


class TritonBackend(Backend):
    """GPU kernels generated per fused op; dense matmuls on cuBLAS; layout ops as views."""

    NAME = "triton"
    # Expert segments are aligned to the grouped GEMM's 64-row tiles.
    PIPELINE = sparse_pipeline(block=64)
    LEGALIZE = "hoist-region-invariants"  # masks then read data, never slice it
    STAGES = ("kernels", "launcher", "source")
    EMIT_ALIASES = {"triton": "source"}
    STAGE_SUFFIX = "py"
    OUTPUTS = "torch"
    INPUTS = "any"
    DEVICES = ("cpu", "cuda")  # CPU tensors go to Triton's interpreter

    def unavailable(self) -> str | None:
        """Runs where torch sees an NVIDIA GPU (the interpreter without one is for tests: named explicitly)."""
        try:
            import torch
        except ImportError:
            return "torch is not installed"
        if not torch.cuda.is_available():
            return "no NVIDIA GPU here"
        return None

    def lowering(self, op: Operation) -> Any:
        from sparsa.backends.triton import codegen  # noqa: F401 (every dialect's rules registered)
        from sparsa.backends.triton.program import LOWERINGS

        return LOWERINGS.find(op)

    def compile(self, func: Operation, options: Mapping[str, Any] | None = None) -> Executable:
        from sparsa.backends.triton.function import TritonFunction

        self.legalize(func)
        self.check(func)
        return TritonFunction(func, (options or {}).get("exchange"))

    def graphs(self, executable: Executable) -> Any:
        from sparsa.backends.triton.function import CudaGraphs

        return CudaGraphs(executable)
