"""What `torch.compile(backend="sparsa")` did with each graph: its partitions and their targets, and every op
left to PyTorch with the reason (`sparsa.report()`); a one-line summary per graph on the `sparsa` logger at
INFO, and each fallback's first occurrence on stderr with SPARSA_LOG=fallbacks."""

from __future__ import annotations

import logging
import os
import sys
from collections import Counter
from dataclasses import dataclass, field

LOG = logging.getLogger("sparsa")


@dataclass
class PartitionRecord:
    """A partition compiled by Sparsa: its name in the graph, the target it runs on, its IR ops by name."""

    name: str
    target: str
    ops: Counter[str] = field(default_factory=Counter)


@dataclass
class GraphRecord:
    """One graph Dynamo handed over."""

    index: int
    partitions: list[PartitionRecord] = field(default_factory=list)
    fallbacks: Counter[tuple[str, str]] = field(default_factory=Counter)  # (ATen op, reason) -> nodes
    kept: list[tuple[str, str]] = field(default_factory=list)  # partitions left to PyTorch by choice, and why

    def summary(self) -> str:
        targets = Counter(p.target for p in self.partitions)
        parts = ", ".join(f"{n} on {t}" for t, n in sorted(targets.items())) or "none compiled"
        falls = sum(self.fallbacks.values())
        worst = "; ".join(f"{op}: {why}" for (op, why), _ in self.fallbacks.most_common(3))
        tail = f", {falls} op(s) in PyTorch ({worst}{'; ...' if len(self.fallbacks) > 3 else ''})" if falls else ""
        return f"sparsa: graph {self.index}: partitions {parts}{tail}"


@dataclass
class CompileReport:
    """Every graph compiled so far in this process, for `sparsa.report()`."""

    graphs: list[GraphRecord] = field(default_factory=list)
    _said: set[tuple[str, str]] = field(default_factory=set)

    def new_graph(self) -> GraphRecord:
        record = GraphRecord(len(self.graphs))
        self.graphs.append(record)
        return record

    def fallback(self, graph: GraphRecord, op: str, why: str) -> None:
        """Count one node left to PyTorch; with SPARSA_LOG=fallbacks say the first of each (op, reason)."""
        graph.fallbacks[(op, why)] += 1
        if (op, why) not in self._said and "fallbacks" in os.environ.get("SPARSA_LOG", ""):
            print(f"sparsa: falls back to PyTorch for {op}: {why}", file=sys.stderr)
        self._said.add((op, why))

    def finish(self, graph: GraphRecord) -> None:
        LOG.info(graph.summary())

    @property
    def fallbacks(self) -> Counter[tuple[str, str]]:
        """(op, reason) -> nodes left to PyTorch, over every graph."""
        total: Counter[tuple[str, str]] = Counter()
        for g in self.graphs:
            total.update(g.fallbacks)
        return total

    @property
    def partitions(self) -> list[PartitionRecord]:
        return [p for g in self.graphs for p in g.partitions]

    def clear(self) -> None:
        self.graphs.clear()
        self._said.clear()

    def __str__(self) -> str:
        lines = [f"sparsa: {len(self.graphs)} graph(s), {len(self.partitions)} partition(s) compiled, "
                 f"{sum(self.fallbacks.values())} op(s) left to PyTorch"]
        for g in self.graphs:
            lines.append(f"graph {g.index}:")
            lines += [f"  {p.name}: {p.target} ({sum(p.ops.values())} ops: "
                      f"{', '.join(f'{n} x{c}' for n, c in _first(p.ops)[:5])})" for p in g.partitions]
            lines += [f"  kept in PyTorch: {name}: {why}" for name, why in g.kept]
            lines += [f"  falls back: {op} x{n}: {why}" for (op, why), n in g.fallbacks.most_common()]
        return "\n".join(lines)


def _first(ops: Counter[str]) -> list[tuple[str, int]]:
    """A partition's ops, the sparse and dense-matmul ones (what it is compiled for) before the rest."""
    def key(item: tuple[str, int]) -> tuple[bool, int]:
        name, count = item
        return (not (name.split(".")[0] in ("attn", "moe", "scan", "sparse") or name == "tensor.matmul"), -count)

    return sorted(ops.items(), key=key)


REPORT = CompileReport()  # the process's record, read by `sparsa.report()`


def report() -> CompileReport:
    """What the torch.compile backend compiled so far in this process, and what it left to PyTorch and why."""
    return REPORT
