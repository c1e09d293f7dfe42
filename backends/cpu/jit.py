"""MLIR -> LLVM -> native code with the ExecutionEngine of the MLIR Python bindings, and calls through the
C interface with NumPy arrays (memref descriptors built by `torch_mlir.runtime`)."""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

import numpy as np
from torch_mlir import execution_engine, ir, passmanager
from torch_mlir import runtime as rt
from torch_mlir.dialects.transform import interpreter

from sparsa.backends.cpu.lower import lower_function
from sparsa.ir.core import Operation
from sparsa.ir.types import numpy_dtype

# After the schedule (tiled, vectorized, bufferized), from vectors and loops to LLVM.
PIPELINE = ("builtin.module(convert-vector-to-scf,convert-linalg-to-loops,expand-strided-metadata,lower-affine,"
            "convert-scf-to-cf,convert-vector-to-llvm,convert-math-to-llvm,finalize-memref-to-llvm,"
            "convert-func-to-llvm,convert-arith-to-llvm,convert-cf-to-llvm,convert-ub-to-llvm,"
            "reconcile-unrealized-casts)")

# Register tile of a matmul: TILE_M x TILE_N accumulators updated by one outer product per step of k. On
# this machine (AVX-512, one core) 8x32 gave 150-215 GFLOP/s from 250x130x70 to 1000^3 (4x32: 67-118,
# 8x16: 62-158); OpenBLAS sgemm on both cores measured 126 in the same session.
TILE_M, TILE_N = 8, 32


def tiles(kind: str, rank: int) -> list[int]:
    """Tile sizes of a scheduled op's loops: the last two output dims by TILE_M x TILE_N (the last by TILE_N
    for a vector), 1 for leading dims, and 1 for a matmul's reduction."""
    out = [1] * max(0, rank - 2) + ([TILE_M, TILE_N] if rank >= 2 else [TILE_N])
    return out + [1] if kind == "matmul" else out


def schedule(ops: list[tuple[str, str, tuple, str, tuple]]) -> str:
    """The transform-dialect script run on the lowered module (kept as the `schedule` stage).

    Matmuls, elementwise ops and reductions are tiled (`tiles`); where a tiled dim is not a known multiple of its tile,
    the loop is peeled so that every full tile has a static shape (the remainder runs as scalar loops).
    The full tiles (matched by their static result type) are vectorized, the module is bufferized,
    contractions become outer products, and the accumulators are hoisted out of the k loop so they stay in
    registers. Other ops stay loops for now: vectorizing a whole untiled op would unroll it into one huge
    vector.
    """
    lines = ["module attributes {transform.with_named_sequence} {",
             "  transform.named_sequence @__transform_main(%root: !transform.any_op {transform.consumed}) {"]
    loop = '!transform.op<"scf.for">'
    for i, (tag, kind, shape, _, _) in enumerate(ops):
        sizes = tiles(kind, len(shape))
        lines.append(f"    %op{i} = transform.structured.match attributes{{{tag}}} in %root "
                     f": (!transform.any_op) -> !transform.any_op")
        lines.append(f"    %t{i}, %l{i}:{len(sizes)} = transform.structured.tile_using_for %op{i} tile_sizes "
                     f"[{', '.join(map(str, sizes))}] : (!transform.any_op) -> "
                     f"(!transform.any_op{f', {loop}' * len(sizes)})")
        for axis in sorted(range(max(0, len(shape) - 2), len(shape)), reverse=True):  # inner first: peel clones
            if shape[axis] is None or shape[axis] % sizes[axis]:
                lines.append(f"    %p{i}_{axis}, %r{i}_{axis} = transform.loop.peel %l{i}#{axis} : ({loop}) -> "
                             f"(!transform.any_op, !transform.any_op)")
    lines += [
        "    %f = transform.structured.match ops{[\"func.func\"]} in %root : (!transform.any_op) -> !transform.any_op",
        "    transform.apply_patterns to %f { transform.apply_patterns.canonicalization } : !transform.any_op"]
    for i, (tag, kind, shape, dtype, out_dims) in enumerate(ops):
        sizes = tiles(kind, len(shape))
        tile = "x".join(str(sizes[d]) if d >= 0 else "1" for d in out_dims)
        lines += [f"    %v{i} = transform.structured.match attributes{{{tag}}} filter_result_type = "
                  f"tensor<{tile}x{dtype}> in %f : (!transform.any_op) -> !transform.any_op",
                  f"    transform.structured.vectorize %v{i} : !transform.any_op"]
    lines += [
        "    transform.apply_patterns to %f {",
        "      transform.apply_patterns.vector.reduction_to_contract",
        "      transform.apply_patterns.vector.transfer_permutation_patterns",
        "      transform.apply_patterns.canonicalization",
        "    } : !transform.any_op",
        "    %b = transform.bufferization.one_shot_bufferize %root {bufferize_function_boundaries = true, "
        "function_boundary_type_conversion = 1 : i32} : (!transform.any_op) -> !transform.any_op",
        "    %f2 = transform.structured.match ops{[\"func.func\"]} in %b : (!transform.any_op) -> !transform.any_op",
        "    transform.apply_cse to %f2 : !transform.any_op  // then a tile written back in place is no copy",
        "    transform.apply_patterns to %f2 {",
        '      transform.apply_patterns.vector.lower_contraction lowering_strategy = "outerproduct"',
        "      transform.apply_patterns.vector.transfer_permutation_patterns",
        "      transform.apply_patterns.canonicalization",
        "    } : !transform.any_op",
        "    %h = transform.structured.hoist_redundant_vector_transfers %f2 : (!transform.any_op) -> !transform.any_op",
        "    transform.apply_patterns to %h {",
        "      transform.apply_patterns.vector.lower_outerproduct",
        '      transform.apply_patterns.vector.reorder_multi_reduction_dims lowering_strategy = "innerreduction"',
        '      transform.apply_patterns.vector.multi_reduction_flattening lowering_strategy = "innerreduction"',
        '      transform.apply_patterns.vector.multi_reduction_unrolling lowering_strategy = "innerreduction"',
        "      transform.apply_patterns.vector.lower_transfer max_transfer_rank = 1",
        "      transform.apply_patterns.vector.lower_transpose",
        "      transform.apply_patterns.vector.lower_broadcast",
        "      transform.apply_patterns.vector.lower_masks",
        "      transform.apply_patterns.canonicalization",
        "    } : !transform.any_op",
        "    transform.yield",
        "  }",
        "}",
    ]
    return "\n".join(lines) + "\n"
_CTYPES = {"f32": ctypes.c_float, "f64": ctypes.c_double, "i64": ctypes.c_int64, "i32": ctypes.c_int32,
           "i8": ctypes.c_int8, "i1": ctypes.c_bool}
_libc = ctypes.CDLL(None)


class CpuFunction:
    """A Sparsa function compiled to native code; `stages` keeps the MLIR text before and after lowering."""

    def __init__(self, func_op: Operation):
        self.func_op = func_op
        self.context = ir.Context()
        with self.context, ir.Location.unknown():
            module, self.entry, params, scheduled = lower_function(func_op)
            self.param_names = [p.attributes["name"] for p in params]
            self.param_types = [p.result.type for p in params]
            self.stages = {"mlir": str(module), "schedule": schedule(scheduled)}
            script = ir.Module.parse(self.stages["schedule"])
            interpreter.apply_named_sequence(module.operation, script.body.operations[0], script)
            self.stages["loops"] = str(module)  # tiled, vectorized and bufferized: vectors and loops
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
