"""Where the work goes: per op, the FLOPs a dense model would do vs the FLOPs actually done, block maps of
attention, tokens per expert of each MoE, and the kernel each sparse op chose (and why)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sparsa.backends.reference.interpreter import Interpreter
from sparsa.ir.core import Operation

EMPTY_CHAR, PARTIAL_CHAR, FULL_CHAR = ".", "+", "#"


@dataclass
class OpReport:
    """One executed op: its name, source position, dense-equivalent and done FLOPs, and a note."""

    name: str
    where: str
    dense_flops: float
    flops: float
    note: str = ""
    bytes: float = 0.0
    block_map: np.ndarray | None = None
    tokens_per_expert: list[int] | None = None


@dataclass
class Report:
    """Everything `explain` found for one call."""

    ops: list[OpReport] = field(default_factory=list)

    @property
    def dense_flops(self) -> float:
        return sum(o.dense_flops for o in self.ops)

    @property
    def flops(self) -> float:
        return sum(o.flops for o in self.ops)

    def summary(self) -> dict[str, Any]:
        attention = [{"where": o.where, "blocks": _counts(o.block_map), "kernel": o.note}
                     for o in self.ops if o.block_map is not None or o.name == "attn.attention"]
        moe = [{"where": o.where, "tokens_per_expert": o.tokens_per_expert, "note": o.note}
               for o in self.ops if o.tokens_per_expert is not None]
        kernels = [{"op": o.name, "where": o.where, "kernel": o.note} for o in self.ops
                   if o.name.startswith(("sparse.", "moe.grouped", "attn.attention", "scan.fused"))]
        return {"dense_flops": self.dense_flops, "flops": self.flops, "bytes": sum(o.bytes for o in self.ops),
                "flops_saved": 1.0 - self.flops / self.dense_flops if self.dense_flops else 0.0,
                "attention": attention, "moe": moe, "kernels": kernels}


def _counts(bm: np.ndarray | None) -> dict[str, int] | None:
    if bm is None:
        return None
    return {"empty": int((bm == 0).sum()), "partial": int((bm == 1).sum()), "full": int((bm == 2).sum())}


class RecordingInterpreter(Interpreter):
    """The reference interpreter, noting each top-level op's work as it runs."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.report = Report()
        self._top = {id(op) for op in self.func.regions[0].block.ops}

    def _compute(self, op: Operation) -> None:
        super()._compute(op)
        if id(op) not in self._top or op.NAME in ("func.param", "tensor.constant"):
            return
        args = [self.values.get(id(v)) for v in op.operands]
        outs = [self.values.get(id(r)) for r in op.results]
        where = f"{op.loc.file.rsplit('/', 1)[-1]}:{op.loc.line}" if op.loc else "?"
        self.report.ops.append(describe(op, args, outs, where))


def describe(op: Operation, args: list[Any], outs: list[Any], where: str) -> OpReport:
    """FLOPs (dense-equivalent and done) and a note for one executed op: the op's own `cost`."""
    c = op.cost(args, outs)
    moved = c.bytes if c.bytes is not None else float(sum(getattr(a, "nbytes", 0) for a in (*args, *outs)))
    return OpReport(op.NAME, where, c.dense, c.done, c.note, moved, block_map=c.block_map,
                    tokens_per_expert=c.tokens_per_expert)


def ascii_map(bm: np.ndarray, width: int = 64) -> str:
    """A block map as text: '#' FULL, '+' PARTIAL, '.' EMPTY (downsampled to at most `width` columns)."""
    m = bm.reshape(-1, bm.shape[-2], bm.shape[-1])[0]
    step = max(1, -(-max(m.shape) // width))
    rows = []
    for i in range(0, m.shape[0], step):
        line = []
        for j in range(0, m.shape[1], step):
            tile = m[i : i + step, j : j + step]
            line.append(FULL_CHAR if (tile == 2).all() else EMPTY_CHAR if (tile == 0).all() else PARTIAL_CHAR)
        rows.append("".join(line))
    scale = f" (each character is {step}x{step} tiles)" if step > 1 else ""
    return "\n".join(rows) + f"\n  {FULL_CHAR} full  {PARTIAL_CHAR} partial  {EMPTY_CHAR} empty{scale}"


def save_block_map_png(bm: np.ndarray, path: str, title: str) -> None:
    """Draw a block map in three colors with labeled axes."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.colors import ListedColormap
        from matplotlib.patches import Patch
    except ImportError as e:
        from sparsa.ir.diagnostics import SparsaError

        raise SparsaError(f"--block-map needs matplotlib ({e}); install it with: pip install matplotlib") from None
    m = bm.reshape(-1, bm.shape[-2], bm.shape[-1])[0]
    colors = ["#f2f2f2", "#f4a261", "#264653"]
    fig, ax = plt.subplots(figsize=(6, 6))
    ax.imshow(m, cmap=ListedColormap(colors), vmin=0, vmax=2, interpolation="nearest")
    ax.set_xlabel("key block")
    ax.set_ylabel("query block")
    ax.set_title(title)
    ax.legend(handles=[Patch(color=c, label=n) for c, n in zip(colors, ["empty", "partial", "full"], strict=True)],
              loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def format_report(report: Report, model_name: str) -> str:
    """The explain table, totals, MoE routing and attention block maps as text."""
    lines = [f"{model_name}: {report.flops / 1e9:.3f} GFLOP done of {report.dense_flops / 1e9:.3f} dense-equivalent "
             f"({1 - report.flops / report.dense_flops if report.dense_flops else 0:.1%} skipped)", ""]
    lines.append(f"{'op':<28} {'where':<28} {'dense GFLOP':>12} {'done GFLOP':>11} {'done':>6} {'MB':>8}  "
                 "kernel / note")
    shown = [o for o in report.ops if o.note or o.dense_flops >= 1e-3 * report.dense_flops]
    for o in shown:
        ratio = f"{o.flops / o.dense_flops:.0%}" if o.dense_flops else "-"
        lines.append(f"{o.name:<28} {o.where:<28} {o.dense_flops / 1e9:>12.4f} {o.flops / 1e9:>11.4f} {ratio:>6} "
                     f"{o.bytes / 1e6:>8.2f}  {o.note}".rstrip())
    if len(shown) < len(report.ops):
        lines.append(f"({len(report.ops) - len(shown)} small ops under 0.1% of the work not shown)")
    for o in report.ops:
        if o.tokens_per_expert is not None:
            lines += ["", f"moe routing at {o.where}: tokens per expert {o.tokens_per_expert}; {o.note}"]
    for o in report.ops:
        if o.block_map is not None:
            lines += ["", f"block map of attention at {o.where}: {o.note}", ascii_map(o.block_map)]
    return "\n".join(lines) + "\n"
