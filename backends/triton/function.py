"""A function compiled for the triton target: the generated module (kernels + launcher), constants prepared
once per weight load and device, and calls on torch tensors (NumPy in, NumPy out also works)."""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from sparsa.backends.base import Executable
from sparsa.backends.triton.codegen import generate
from sparsa.backends.triton.program import Const
from sparsa.ir.analysis import RuntimeShapeError, bind_names, bind_shape, check_int_range
from sparsa.ir.core import Operation
from sparsa.ir.diagnostics import SparsaError
from sparsa.ir.types import is_float

_KIND = {"f": "floating point", "i": "integer", "b": "boolean"}


def _kind(dtype: str) -> str:
    return "b" if dtype == "i1" else "f" if is_float(dtype) else "i"


def pick_device() -> str:
    """'cuda' with an NVIDIA GPU; otherwise 'cpu', with the kernels run by Triton's interpreter (slow: for
    testing), said once."""
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if os.environ.get("TRITON_INTERPRET") != "1":
        # Triton reads this when a function is decorated, its own library's functions included: it must be
        # set before Triton's language module is imported.
        standard = sys.modules.get("triton.language.standard")
        if standard is not None and type(standard.zeros).__name__ != "InterpretedFunction":
            raise SparsaError("no NVIDIA GPU here, and Triton was imported before TRITON_INTERPRET=1 was set, so "
                              "its interpreter cannot run target 'triton': set TRITON_INTERPRET=1 in the "
                              "environment before starting Python")
        os.environ["TRITON_INTERPRET"] = "1"
        warnings.warn("no NVIDIA GPU here: target 'triton' runs its kernels in Triton's interpreter on the CPU "
                      "(TRITON_INTERPRET=1), which is slow and meant for testing", RuntimeWarning, stacklevel=3)
    return "cpu"


class TritonFunction(Executable):
    """Kernels and launcher of one function; `stages` has the texts `kernels`, `launcher` and `source`."""

    def __init__(self, func: Operation, exchange: Any = None):
        """`exchange`: the process group the host-run exchange ops of an expert-parallel function use."""
        self.func = func
        self.exchange = exchange
        self.program = generate(func)
        self.stages = {"kernels": self.program.kernels_text, "launcher": self.program.launcher_text,
                       "source": self.program.source}
        self._launch = None
        self._consts: dict[str, list[Any]] = {}
        self.arg_types = [a.type for a in func.regions[0].block.args]

    def launcher(self) -> Any:
        if self._launch is None:
            from sparsa.backends.triton.attention import load_kernel_module

            self._launch = load_kernel_module(self.program.launcher_name, self.program.source)
        return self._launch

    def reset(self) -> None:
        """Forget the constants (new weights were loaded)."""
        self._consts = {}

    def constants(self, cache: dict[int, tuple[np.ndarray, ...]], device: str) -> list[Any]:
        """The launcher's constants on `device`, from the weight-only results in `cache` (made once per device
        until `reset`)."""
        if device not in self._consts:
            self._consts[device] = [_prepare(c, cache, device, self.exchange) for c in self.program.consts]
        return self._consts[device]

    def __call__(self, args: Sequence[Any], weights: Mapping[str, Any] | None, cache: dict[int, tuple[np.ndarray, ...]],
                 constant_args: frozenset[int] = frozenset()) -> list[Any]:
        """Run on torch tensors or arrays (checked against the signature); returns torch tensors on the device."""
        import torch

        device = next((str(a.device) for a in args if hasattr(a, "detach") and a.device.type == "cuda"), None)
        device = device or pick_device()
        if device == "cpu" and self.program.bf16_dot is not None:
            raise SparsaError("Triton's interpreter cannot run bfloat16 dots (it multiplies their bit patterns: "
                              "triton-lang/triton#11584); run this model on an NVIDIA GPU, or in float16/float32 "
                              "without one", self.program.bf16_dot.loc)
        dims: dict[str, int] = {}
        bind_names([(t, tuple(x.shape)) for t, x in zip(self.arg_types, args, strict=True)], dims)
        tensors = []
        for i, (t, x) in enumerate(zip(self.arg_types, args, strict=True)):
            name = self.func.regions[0].block.args[i].name_hint or str(i)
            x = x if hasattr(x, "detach") else torch.from_numpy(np.asarray(x, order="C"))
            bind_shape(t, tuple(x.shape), dims, f"input '{name}'")
            got = "b" if x.dtype == torch.bool else "f" if x.is_floating_point() else "i"
            if got != _kind(t.dtype):
                raise RuntimeShapeError(f"input '{name}' must have element type {t.dtype}, got {x.dtype}")
            if got == "i" and x.numel() and x.element_size() > _torch_dtype(t.dtype).itemsize:
                check_int_range(int(x.min()), int(x.max()), t.dtype, f"input '{name}'")
            tensors.append(x.to(device=device, dtype=_torch_dtype(t.dtype)))
        outs = self.launcher()(device, self.constants(cache, device), *tensors)
        return list(outs)


def _torch_dtype(dt: str) -> Any:
    import torch

    return {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16, "f64": torch.float64,
            "i8": torch.int8, "i32": torch.int32, "i64": torch.int64, "i1": torch.bool}[dt]


def _upload(a: np.ndarray, dt: str, device: str) -> Any:
    import torch

    return torch.from_numpy(np.asarray(a, order="C")).to(device=device, dtype=_torch_dtype(dt))


def _prepare(c: Const, cache: dict[int, tuple[np.ndarray, ...]], device: str, exchange: Any = None) -> Any:
    """One launcher constant from the weight-only results (computed at weight load) or the compile-time map."""
    if c.kind == "value":
        return _upload(cache[id(c.op)][c.index], c.op.results[c.index].type.dtype, device)
    if c.kind == "lists":  # a compile-time block map as the attention kernel reads it
        from sparsa.backends.triton.attention import block_lists

        lists = block_lists(c.op.map.data, device)
        return (lists.full_idx, lists.full_cnt, lists.part_idx, lists.part_cnt, *lists.shape)
    if c.kind == "op":  # an op the launcher runs on the host (host.host_op), in the function's context
        from sparsa.backends.triton.host import HostStep

        return HostStep(c.op, exchange)
    # "bsc": a packed BSR weight indexed by block column, so each program walks only its column's blocks
    from sparsa.backends.triton.host import bsc_index  # (imports Triton: after pick_device has chosen how)

    op = c.op
    row_ptr, col_idx = (_upload(_cached(cache, v), "i64", device) for v in (op.row_ptr, op.col_idx))
    return bsc_index(row_ptr, col_idx, op.cols // op.blocks.type.shape[2])


def _cached(cache: dict[int, tuple[np.ndarray, ...]], v: Any) -> np.ndarray:
    op = v.defining_op
    if op is None or id(op) not in cache:
        raise SparsaError(f"the triton backend needs {v} to be computed from weights only")
    return cache[id(op)][op.results.index(v) if len(op.results) > 1 else 0]


class CudaGraphs:
    """A TritonFunction's calls replayed from CUDA graphs: the launcher (its allocations, kernel launches and
    cuBLAS calls) is captured once per input signature, then each call copies its inputs into the captured
    ones, replays, and returns copies of the outputs. What this saves is the host's work per launch, which
    dominates small calls. Inputs in `static` (parameters) are captured in place, not copied: their values
    may change in place between calls; a new tensor there captures again."""

    def __init__(self, fn: TritonFunction):
        self.fn = fn
        self.graphs: dict[tuple, tuple[tuple, list[Any], list[Any], Any]] = {}  # by shapes, strides, dtypes
        self.captures = 0

    def __call__(self, tensors: list[Any], cache: dict[int, tuple[np.ndarray, ...]],
                 static: frozenset[int]) -> list[Any]:
        signature = tuple((tuple(t.shape), t.stride(), t.dtype, t.device) for t in tensors)
        pointers = tuple(tensors[i].data_ptr() for i in sorted(static))
        entry = self.graphs.get(signature)
        if entry is None or entry[0] != pointers:  # new shapes, or new parameter tensors (the old ones let go)
            entry = self.graphs[signature] = (pointers, *self._capture(tensors, cache, static))
        _, inputs, outputs, graph = entry
        for i, (mine, t) in enumerate(zip(inputs, tensors, strict=True)):
            if i not in static:
                mine.copy_(t)
        graph.replay()
        return [o.clone() for o in outputs]

    def _capture(self, tensors: list[Any], cache: dict[int, tuple[np.ndarray, ...]],
                 static: frozenset[int]) -> tuple[list[Any], list[Any], Any]:
        import torch

        inputs = [t if i in static else torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)
                  .copy_(t) for i, t in enumerate(tensors)]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # a first run compiles the kernels and prepares the constants
            self.fn(inputs, None, cache)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = self.fn(inputs, None, cache)
        self.captures += 1
        return inputs, outputs, graph

