"""The triton target: one Python module per compiled function, holding the generated kernels and a host
launcher that allocates outputs, computes grids and calls the kernels in program order.

Ops map to kernels as follows:
- chains of elementwise ops (and splat constants, iota) fuse into one generated kernel per group: an op
  is folded into its only user when both have the same shape, so intermediates stay in registers;
- dense `tensor.matmul` is cuBLAS's (torch.matmul, as Inductor's extern mm);
- row reductions and normalizations, top-k, MoE routing and dispatch, BSR and N:M matmuls call the fixed
  kernels of `library.py`;
- `attn.attention`, `attn.block_map` (maps of data masks or symbolic sizes, built per call on the GPU),
  `moe.grouped_matmul[_combine]`, `scan.fused` and `tensor.gather` get kernels generated from their regions;
- layout ops (transpose, expand_dims, squeeze, slice, split, broadcast_to, reshape of a contiguous tensor)
  are views: no kernel, no copy; a reshape that has no view copies with the strided copy kernel;
- what depends only on weights (parameters, packed sparse layouts, compile-time block maps) is prepared
  once per weight load and device and passed to the launcher as constants.
Any other op is refused at compile time with its name and `.sp` line.
"""

from __future__ import annotations

import hashlib
import re
import textwrap
from dataclasses import dataclass, field
from typing import Any

from sparsa.backends.table import LoweringTable
from sparsa.ir.analysis import weight_only_ops
from sparsa.ir.core import Operation, Value
from sparsa.ir.diagnostics import SparsaError
from sparsa.ir.dims import Dim
from sparsa.ir.traits import Elementwise
from sparsa.ir.types import TensorType

TORCH_DTYPES = {"f32": "torch.float32", "f16": "torch.float16", "bf16": "torch.bfloat16", "f64": "torch.float64",
                "i8": "torch.int8", "i32": "torch.int32", "i64": "torch.int64", "i1": "torch.bool"}

def loc_comment(op: Operation) -> str:
    return f"{op.NAME}" + (f' from "{op.loc.file}":{op.loc.line}' if op.loc else "")


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class Const:
    """A launcher constant prepared once per weight load and device: a weight-only value, the column index
    of a packed BSR weight, or the block lists of a compile-time block map."""

    kind: str  # "value" | "bsc" | "lists" | "op"
    op: Operation
    index: int = 0


LOWERINGS = LoweringTable("triton lowerings")


@dataclass
class TritonProgram:
    """Kernels and launcher of one function, built by `generate` (see the module docstring): the lowering
    context every dialect's rules write into."""

    func: Operation
    kernels: dict[str, str] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)
    consts: list[Const] = field(default_factory=list)
    names: dict[int, str] = field(default_factory=dict)
    inputs: list[str] = field(default_factory=list)
    returned: set[int] = field(default_factory=set)
    bf16_dot: Operation | None = None  # the first op with a bfloat16 tl.dot (see function.py)
    made: int = 0  # launcher variables named so far (`new`): a name is never given twice

    def __post_init__(self) -> None:
        self.weight_only = weight_only_ops(self.func)

    def note_dot(self, op: Operation, dtype: str) -> None:
        """Record the first op whose tl.dot reads bfloat16 (Triton's interpreter cannot run those)."""
        if dtype == "bf16" and self.bf16_dot is None:
            self.bf16_dot = op

    # ---- names and shapes --------------------------------------------------------------------------------
    def name(self, v: Value) -> str:
        key = id(v)
        if key not in self.names:
            op = v.defining_op
            if op is None or id(op) not in self.weight_only:
                raise SparsaError(f"triton launcher: value {v} used before it is computed")
            self.names[key] = f"C[{len(self.consts)}]"
            self.consts.append(Const("value", op, op.results.index(v) if len(op.results) > 1 else 0))
        return self.names[key]

    @staticmethod
    def dim(d: Dim) -> str:
        if isinstance(d, int):
            return str(d)
        if d is None:
            raise SparsaError("triton launcher: a dim unknown at compile time where a shape is needed")
        return re.sub(r"[A-Za-z_][A-Za-z0-9_]*", lambda m: f"d_{m.group(0)}", d)

    def shape(self, t: TensorType) -> str:
        dims = [self.dim(d) for d in t.shape]
        return "(" + ", ".join(dims) + ("," if len(dims) == 1 else "") + ")"

    def alloc(self, v: Value, name: str, runtime: str) -> None:
        """`name = torch.empty(shape)` for `v`: its shape from the type (symbolic dims as the launcher's
        `d_*` sizes) or, where the type has a dim unknown at compile time, `runtime` (from operand shapes)."""
        shape = self.shape(v.type) if all(d is not None for d in v.type.shape) else runtime
        self.lines.append(f"{name} = torch.empty({shape}, dtype={TORCH_DTYPES[v.type.dtype]}, device=dev)")

    def new(self, v: Value) -> str:
        self.made = max(self.made, len(self.names))  # the count of names, unless a name was given again
        n = f"v{self.made}"
        self.made += 1
        self.names[id(v)] = n
        return n

    def kernel(self, name: str, source: str) -> None:
        self.kernels[name] = source

    # ---- driving ------------------------------------------------------------------------------------------
    def generate(self) -> TritonProgram:
        """Emit every op's kernels and launcher lines, in program order; returns self."""
        block = self.func.regions[0].block
        for i, a in enumerate(block.args):
            n = re.sub(r"\W", "_", a.name_hint or f"arg{i}")
            n = f"x_{n}"
            self.names[id(a)] = n
            self.inputs.append(n)
        seen: set[str] = set()
        for i, a in enumerate(block.args):
            for axis, d in enumerate(a.type.shape):
                if isinstance(d, str) and re.fullmatch(r"[A-Za-z_]\w*", d) and d not in seen:
                    seen.add(d)
                    self.lines.append(f"d_{d} = {self.inputs[i]}.shape[{axis}]")
        term = block.terminator
        self.returned = {id(v) for v in term.operands}
        for op in block.ops:
            if op.TERMINATOR:
                outs = ", ".join(self.name(v) for v in op.operands)
                self.lines.append(f"return ({outs}{',' if len(op.operands) == 1 else ''})")
                break
            if id(op) in self.weight_only:
                continue
            start = len(self.lines)
            self.emit(op)
            if len(self.lines) > start:  # an op folded into another's kernel, or a constant, emits nothing
                self.lines.insert(start, f"# {loc_comment(op)}")
        return self

    def emit(self, op: Operation) -> None:
        """The launcher lines (and kernels) of one op, by its LOWERINGS rule; an op without one is refused with
        its name and `.sp` line."""
        rule = LOWERINGS.find(op)
        if rule is None:
            raise SparsaError(f"'{op.NAME}' is not supported by the triton backend", op.loc)
        rule(self, op)
        values = [*op.operands, *op.results[:1]]
        if not isinstance(op, Elementwise) and all(id(v) in self.names for v in values):  # (fused chains: their own)
            shapes = [f"{self.name(v)}.shape" for v in op.operands]
            self.check_unknown_dims(op, shapes, f"{self.name(values[-1])}.shape")

    def check_unknown_dims(self, op: Operation, operands: list[str], result: str) -> None:
        """A launcher line checking, at each call, that op's operand dims of unknown size (`?`) are the result's
        (`check_unknown_dims`, as on the other targets), given the expressions of their shapes and the result's."""
        if hasattr(op, "check_unknown_dims") and any(None in v.type.shape for v in op.operands):
            self.lines.append(f"unknown_dims(C[{len(self.consts)}], ({', '.join(operands)},), {result})")
            self.consts.append(Const("op", op))

    # ---- the module ---------------------------------------------------------------------------------------
    @property
    def kernels_text(self) -> str:
        return "\n".join(src.strip("\n") + "\n\n" for src in self.kernels.values()).rstrip() + "\n"

    @property
    def launcher_name(self) -> str:
        # the parameter list too: two functions with the same body and their inputs in another order differ
        return f"launch_{digest(self.kernels_text + ', '.join(self.inputs) + chr(10) + chr(10).join(self.lines))}"

    @property
    def launcher_text(self) -> str:
        sym = self.func.attributes.get("sym_name", "model")
        args = ", ".join(["dev", "C", *self.inputs])
        doc = (f'    """@{sym} on `dev`: C holds the prepared weights and block maps; inputs are torch tensors '
               f'already checked against the signature."""\n')
        return f"def {self.launcher_name}({args}):\n" + doc + textwrap.indent("\n".join(self.lines), " " * 4) + "\n"

    @property
    def source(self) -> str:
        head = ('"""Generated by Sparsa (target triton): kernels, then the host launcher."""\n'
                "import math\n\nimport torch\nimport triton\nimport triton.language as tl\n\n"
                "from sparsa.backends.triton import library as lib\n"
                "from sparsa.backends.triton.host import (align_segments, bsc_index, bstrides, cdiv, contiguous,\n"
                "    copy, dense_lists, dense_map, host_op, last_contiguous, map_lists, npow2, reshape, rows,\n"
                "    scan_args, slice_checked, unknown_dims, unpermute)\n"
                "from sparsa.ir.dialects.moe import expert_capacity\n\n")
        return head + self.kernels_text + "\n\n" + self.launcher_text


def dot_precision(dtype: str) -> str:
    """tl.dot's input precision: float32 in full precision (as PyTorch's default matmul), not TF32."""
    return "ieee" if dtype == "f32" else "tf32"


def npow2(n: int) -> int:
    """The smallest power of two >= n (and >= 1): Triton's tl.arange needs power-of-two extents."""
    return 1 << max(0, (int(n) - 1).bit_length())


def literal(v: Any) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, float) and v != v:
        return "float('nan')"
    if v in (float("inf"), float("-inf")):
        return f"float('{v}')"
    return repr(v)


def tl_dtype(dt: str) -> str:
    return {"f32": "tl.float32", "f16": "tl.float32", "bf16": "tl.float32", "f64": "tl.float64", "i8": "tl.int8",
            "i32": "tl.int32", "i64": "tl.int64", "i1": "tl.int1"}[dt]
