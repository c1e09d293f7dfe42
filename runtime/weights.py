"""Weights: what a compiled model expects, loading (.safetensors, .npz, dicts), checking, random init."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from sparsa.ir.core import Module
from sparsa.ir.diagnostics import Location, SparsaError
from sparsa.ir.dialects.sparse import layout_violation
from sparsa.ir.types import Layout, TensorType, numpy_dtype, round_to_dtype, show_type


class WeightError(SparsaError):
    """Weights that do not fit the model: missing, unexpected, mis-shaped or breaking a sparse layout."""


@dataclass(frozen=True)
class WeightSpec:
    """One weight the model reads: its dotted name, dense type, sparse layout, and where it is declared."""

    name: str
    type: TensorType
    layout: Layout | None
    loc: Location | None

    def describe(self) -> str:
        layout = f" sparse {self.layout.kind}{self.layout.params}" if self.layout else ""
        return show_type(self.type) + layout


def weight_specs(module: Module) -> dict[str, WeightSpec]:
    """The weights of a module's functions, in declaration order."""
    specs: dict[str, WeightSpec] = {}
    for op in module.walk():
        if op.NAME != "func.param":
            continue
        layout = next((u.op.result.type.layout for u in op.result.uses if u.op.NAME == "sparse.convert"), None)
        specs[op.attributes["name"]] = WeightSpec(op.attributes["name"], op.result.type, layout, op.loc)
    return specs


def read_weights(source: str | os.PathLike | Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Arrays by name from a .safetensors or .npz file, or a dict of NumPy arrays / torch tensors."""
    if isinstance(source, Mapping):
        return {str(k): to_numpy(v) for k, v in source.items()}
    path = os.fspath(source)
    if not os.path.exists(path):
        raise WeightError(f"weights file {path} does not exist")
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file

        try:
            return dict(load_file(path))
        except Exception as e:  # the library raises several types for a corrupt file
            raise WeightError(f"cannot read {path} as safetensors: {e}") from None
    if path.endswith(".npz"):
        with np.load(path) as data:
            return {k: data[k] for k in data.files}
    raise WeightError(f"weights must be a .safetensors or .npz file (or a dict), got {path}")


def to_numpy(x: Any) -> np.ndarray:
    """A NumPy array from a NumPy array, a torch tensor (any device, bf16 widened) or a Python value."""
    if type(x) is np.ndarray:
        return x
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        t = x.detach().cpu()
        if str(t.dtype) == "torch.bfloat16":
            t = t.float()
        return t.numpy()
    return np.asarray(x)


def check_weights(specs: Mapping[str, WeightSpec], arrays: Mapping[str, np.ndarray],
                  prune: bool = False) -> dict[str, np.ndarray]:
    """Arrays converted to each weight's element type; a WeightError lists every problem found."""
    problems: list[str] = []
    out: dict[str, np.ndarray] = {}
    for name, spec in specs.items():
        if name not in arrays:
            problems.append(f"missing weight '{name}' ({spec.describe()})")
            continue
        a = arrays[name]
        want = spec.type
        shape_ok = a.ndim == want.rank and all(
            not isinstance(d, int) or d == n for d, n in zip(want.shape, a.shape, strict=True))
        if not shape_ok:
            problems.append(f"weight '{name}' has shape {list(a.shape)} but the model expects {show_type(want)}")
            continue
        if (a.dtype.kind == "f") != (numpy_dtype(want.dtype).kind == "f") or a.dtype.kind not in "fiub":
            problems.append(f"weight '{name}' has element type {a.dtype} but the model expects {want.dtype}")
            continue
        a = round_to_dtype(a, want.dtype)
        if spec.layout is not None:
            if prune:
                a = prune_to_layout(a, spec.layout)
            why = layout_violation(a, spec.layout)
            if why:
                problems.append(f"weight '{name}' does not fit its layout {spec.layout}: {why} "
                                f"(pass prune=True to prune it by magnitude)")
                continue
        out[name] = a
    for name in arrays:
        if name not in specs:
            problems.append(f"unexpected weight '{name}' (shape {list(np.shape(arrays[name]))}): the model has "
                            f"no weight of that name")
    if problems:
        raise WeightError("; ".join(problems) if len(problems) == 1 else
                          f"{len(problems)} problems with the weights:\n  " + "\n  ".join(problems))
    return out


def prune_to_layout(w: np.ndarray, layout: Layout) -> np.ndarray:
    """Keep the N largest-magnitude entries of every group of M rows per column (for #nm); #bsr keeps all blocks."""
    if layout.kind != "nm":
        return w
    n, m = layout.params
    rows, cols = w.shape
    groups = w.reshape(rows // m, m, cols)
    order = np.argsort(-np.abs(groups), axis=1, kind="stable")
    keep = np.zeros_like(groups, dtype=bool)
    np.put_along_axis(keep, order[:, :n, :], True, axis=1)
    return np.where(keep, groups, 0).reshape(rows, cols).astype(w.dtype)


def init_weights(specs: Mapping[str, WeightSpec], seed: int, block_density: float = 0.25) -> dict[str, np.ndarray]:
    """Deterministic weights that fit every layout: ones for 1-D (norm scales), N(0, 1/fan_in) otherwise;
    #bsr weights keep a `block_density` fraction of their blocks, #nm ones are pruned by magnitude."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for name, spec in specs.items():
        t = spec.type
        if not t.is_static():
            raise WeightError(f"cannot initialise weight '{name}' ({spec.describe()}): its shape is symbolic")
        shape = tuple(int(d) for d in t.shape)
        if t.dtype in ("i32", "i64", "i1"):
            a = np.zeros(shape, dtype=numpy_dtype(t.dtype))
        elif t.rank <= 1:
            a = np.ones(shape, dtype=np.float32)
        else:
            a = rng.standard_normal(shape).astype(np.float32) / np.float32(np.sqrt(shape[-2]))
        if spec.layout is not None and spec.layout.kind == "bsr":
            br, bc = spec.layout.params
            blocks = rng.random((shape[0] // br, shape[1] // bc)) < block_density
            blocks[rng.integers(0, blocks.shape[0]), rng.integers(0, blocks.shape[1])] = True
            a = a * np.kron(blocks, np.ones((br, bc), dtype=np.float32))
        elif spec.layout is not None:
            a = prune_to_layout(a, spec.layout)
        out[name] = round_to_dtype(a, t.dtype)
    return out
