"""MLIR -> LLVM -> native code with the ExecutionEngine of the MLIR Python bindings, and calls through the
C interface with NumPy arrays (memref descriptors built by `torch_mlir.runtime`)."""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

import numpy as np
from torch_mlir import execution_engine, ir, passmanager
from torch_mlir import runtime as rt

from sparsa.backends.cpu.lower import lower_function
from sparsa.ir.core import Operation
from sparsa.ir.types import numpy_dtype

# Stages from tensors to LLVM. Loops for now: tiling and vectorization come with the transform-dialect
# schedules of the performance work.
PIPELINE = ("builtin.module(one-shot-bufferize{bufferize-function-boundaries "
            "function-boundary-type-conversion=identity-layout-map},convert-linalg-to-loops,convert-scf-to-cf,"
            "convert-math-to-llvm,expand-strided-metadata,finalize-memref-to-llvm,convert-func-to-llvm,"
            "convert-arith-to-llvm,convert-cf-to-llvm,reconcile-unrealized-casts)")
_CTYPES = {"f32": ctypes.c_float, "f64": ctypes.c_double, "i64": ctypes.c_int64, "i32": ctypes.c_int32,
           "i8": ctypes.c_int8, "i1": ctypes.c_bool}
_libc = ctypes.CDLL(None)


class CpuFunction:
    """A Sparsa function compiled to native code; `stages` keeps the MLIR text before and after lowering."""

    def __init__(self, func_op: Operation):
        self.func_op = func_op
        self.context = ir.Context()
        with self.context, ir.Location.unknown():
            module, self.entry, params = lower_function(func_op)
            self.param_names = [p.attributes["name"] for p in params]
            self.param_types = [p.result.type for p in params]
            self.stages = {"mlir": str(module)}
            passmanager.PassManager.parse(PIPELINE).run(module.operation)
            self.stages["llvm"] = str(module)
            self.engine = execution_engine.ExecutionEngine(module, opt_level=3)
        ret = func_op.regions[0].block.terminator.operands[0].type
        self.result_type = ret

    def __call__(self, inputs: Sequence[np.ndarray], params: dict[str, np.ndarray] | None = None) -> np.ndarray:
        """Run on NumPy inputs (in order) and weights (by name)."""
        block = self.func_op.regions[0].block
        types = [a.type for a in block.args] + self.param_types
        values = list(inputs) + [(params or {})[n] for n in self.param_names]
        args = []
        keep = []
        for t_in, x in zip(types, values, strict=True):
            arr = np.ascontiguousarray(x, dtype=numpy_dtype(t_in.dtype))
            keep.append(arr)
            args.append(ctypes.pointer(ctypes.pointer(rt.get_ranked_memref_descriptor(arr))))
        t = self.result_type
        result = rt.make_nd_memref_descriptor(t.rank, _CTYPES[t.dtype])() if t.rank else \
            rt.make_zero_d_memref_descriptor(_CTYPES[t.dtype])()
        self.engine.invoke(self.entry, ctypes.pointer(ctypes.pointer(result)), *args)
        out = np.array(rt.ranked_memref_to_numpy([result]) if t.rank else
                       np.ctypeslib.as_array(result.aligned, shape=()), copy=True)
        allocated = ctypes.cast(result.allocated, ctypes.c_void_p).value
        if allocated and allocated not in {a.ctypes.data for a in keep}:
            _libc.free(ctypes.c_void_p(allocated))  # allocated by the JIT'd code; a returned input is not ours
        return out
