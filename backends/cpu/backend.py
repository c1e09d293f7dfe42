"""The cpu target: Sparsa IR lowered through upstream MLIR (the bindings torch-mlir ships) to LLVM native
code, one kernel per op in one module, run by a small host (`jit.py`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sparsa.backends.base import Backend, Executable
from sparsa.backends.cpu import CpuLoweringError, available, refused_dtype
from sparsa.ir.core import Operation
from sparsa.passes.pipelines import sparse_pipeline


class CpuBackend(Backend):
    """Native code for this machine through MLIR and LLVM; float32 and integer kernels."""

    NAME = "cpu"
    # One kernel per op, the sparse ops as loops over their structure around tiled, vectorized GEMMs; expert
    # segments of 64 rows (the grouped GEMM's work item).
    PIPELINE = sparse_pipeline(block=64, outside_values=False)  # its grouped GEMMs' epilogues read 0-d ones only
    LEGALIZE = "hoist-region-invariants"  # masks then read data, never slice it
    STAGES = ("mlir", "schedule", "host", "loops", "llvm")
    BINARY_STAGES = ("obj",)  # the kernels' object code for the target
    STAGE_SUFFIX = "mlir"
    SPECIALIZES_ON_CONSTANTS = True
    ERROR = CpuLoweringError
    VARIANT = "cpu"  # cpu:x86-64-v3, cpu:x86-64-v4, cpu:aarch64, an LLVM CPU name or triple: ahead-of-time code

    def __init__(self, variant: str | None = None):
        super().__init__(variant)
        self._target: Any = None

    def cannot_run(self) -> str | None:
        why = None if self.unavailable() is not None else self.target.why_not_here()
        return None if why is None else f"it compiles {why}"

    @property
    def target(self) -> Any:
        """The CpuTarget compiled for: this machine, or the one the variant names (a SparsaError if unknown)."""
        if self._target is None:
            from sparsa.backends.cpu.target import host_target, named_target

            self._target = host_target() if self.variant is None else named_target(self.variant)
        return self._target

    def unavailable(self) -> str | None:
        if not available():
            return "torch-mlir's MLIR Python bindings do not import (pip install torch-mlir)"
        return None

    def lowering(self, op: Operation) -> Any:
        from sparsa.backends.cpu import jit  # noqa: F401 (every dialect's rules registered)
        from sparsa.backends.cpu.context import KERNELS, LOWERINGS

        return KERNELS.find(op) or LOWERINGS.find(op)

    def supports(self, op: Operation) -> str | None:
        return refused_dtype(op) or super().supports(op)

    def legalize(self, func: Operation) -> None:
        """LEGALIZE, then each scan backward whose channels cannot go in vector lanes (`grad_lane_plan`) replaced
        by its expansion: the unfused scan and its rules, the states stored."""
        super().legalize(func)
        from sparsa.backends.cpu.scan_grad import grad_lane_plan
        from sparsa.passes.differentiate import expand_scan_grad

        for op in list(func.regions[0].block.ops):
            if op.NAME == "scan.fused_grad" and grad_lane_plan(op) is None:
                expand_scan_grad(op)

    def compile(self, func: Operation, options: Mapping[str, Any] | None = None) -> Executable:
        """Kernels built and compiled to native code now; `options["constant_args"]`: inputs the caller keeps
        the same between calls (what only they and the weights feed runs once, expert weights packed);
        `options["exchange"]`: the process group of an expert-parallel function."""
        from sparsa.backends.cpu.jit import CpuFunction

        self.legalize(func)
        self.check(func)
        options = options or {}
        return CpuFunction(func, frozenset(options.get("constant_args", frozenset())), self.target,
                           options.get("exchange"))
