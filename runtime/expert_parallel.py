"""Expert parallel on torch.distributed: the process group the `moe_exchange` ops exchange rows over (gloo on
CPUs, NCCL on GPUs; torchrun sets the rendezvous), the bytes each call moves, and each rank's weight blocks."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sparsa.ir.core import Module
from sparsa.ir.diagnostics import SparsaError
from sparsa.ir.dialects.func import ParamOp
from sparsa.ir.dialects.moe import MoeOp
from sparsa.ir.dialects.moe_exchange import ExchangePlanOp
from sparsa.ir.types import TensorType
from sparsa.runtime.weights import WeightSpec


@dataclass
class ExchangeCounters:
    """Bytes one rank moved in one call: sent to and received from other ranks, and kept (its own rows, which
    all_to_all copies locally), per exchange in the order they begin, and the small collectives of counts; with
    the seconds from each exchange's start to its rows' arrival on this rank (work overlapped with it, and
    waiting for the slowest rank, included) and the part of them this rank spent blocked in its wait."""

    sent_bytes: int = 0
    received_bytes: int = 0
    local_bytes: int = 0
    count_bytes: int = 0
    count_seconds: float = 0.0
    exchanges: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"sent_bytes": self.sent_bytes, "received_bytes": self.received_bytes,
                "local_bytes": self.local_bytes, "count_bytes": self.count_bytes, "count_seconds": self.count_seconds,
                "exchanges": [dict(e) for e in self.exchanges]}


class TorchExchange:
    """A torch.distributed process group as the IR's `Exchange`: all_gather and all_to_all_single on NumPy rows."""

    def __init__(self, group: Any):
        try:
            import torch
            import torch.distributed as dist
        except ImportError as e:
            raise SparsaError(f"expert_parallel needs torch.distributed ({e}): pip install torch") from None
        if not dist.is_available() or not dist.is_initialized():
            raise SparsaError("expert_parallel needs an initialized process group: call "
                              "torch.distributed.init_process_group('gloo') first (torchrun sets the rendezvous)")
        self.torch, self.dist, self.group = torch, dist, group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        self.device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" \
            else torch.device("cpu")
        self.counters = ExchangeCounters()
        # exchanges begun and not yet waited for, by the array their rows arrive in (kept alive here)
        self._pending: dict[int, tuple] = {}

    def begin_call(self) -> None:
        """Counters from zero: what one call moves."""
        self.counters = ExchangeCounters()

    def _tensor(self, a: np.ndarray) -> Any:
        return self.torch.from_numpy(np.ascontiguousarray(a)).to(self.device)

    def all_gather(self, a: np.ndarray) -> np.ndarray:
        t0 = time.perf_counter()
        mine = self._tensor(a)
        parts = [self.torch.empty_like(mine) for _ in range(self.size)]
        self.dist.all_gather(parts, mine, group=self.group)
        self.counters.count_bytes += a.nbytes * (self.size - 1) * 2
        self.counters.count_seconds += time.perf_counter() - t0
        return np.stack([p.cpu().numpy() for p in parts])

    def all_to_all(self, data: np.ndarray, sends: np.ndarray, receives: np.ndarray) -> np.ndarray:
        return self.wait(self.start(data, sends, receives))

    def start(self, data: np.ndarray, sends: np.ndarray, receives: np.ndarray) -> np.ndarray:
        """The exchange begun (gloo runs it on its own threads); the rows arrive in the array returned. Counted
        now, in the order the exchanges begin (the same on every rank); timed when it is waited for."""
        t0 = time.perf_counter()
        sends, receives = [int(n) for n in sends], [int(n) for n in receives]
        src = self._tensor(data)
        out = self.torch.empty((sum(receives),) + tuple(data.shape[1:]), dtype=src.dtype, device=self.device)
        work = self.dist.all_to_all_single(out, src, output_split_sizes=receives, input_split_sizes=sends,
                                           group=self.group, async_op=True)
        rows = out.numpy() if self.device.type == "cpu" else np.empty(out.shape, data.dtype)
        self._pending[id(rows)] = (work, out, src, rows, t0, self._count(data, sends, receives))
        return rows

    def wait(self, rows: np.ndarray) -> np.ndarray:
        work, out, _src, _rows, t0, entry = self._pending.pop(self._find(rows))
        t1 = time.perf_counter()
        work.wait()
        result = rows if self.device.type == "cpu" else out.cpu().numpy()
        t2 = time.perf_counter()
        if entry is None:
            self.counters.count_seconds += t2 - t0
        else:  # begun to arrived (work ran meanwhile), and the part of it this rank spent blocked
            entry["seconds"], entry["waited_seconds"] = t2 - t0, t2 - t1
        return result

    def _find(self, rows: np.ndarray) -> int:
        """The pending exchange whose rows `rows` are: the array `start` returned, or a view of its memory (a
        host that wraps it in a tensor and back); else the first begun of the same shape and element type (a
        host that copied it to a GPU and back before the rows arrived)."""
        if id(rows) in self._pending:
            return id(rows)
        alike = [key for key, (*_, mine, _t0, _entry) in self._pending.items()
                 if mine.shape == rows.shape and mine.dtype == rows.dtype]
        same = [key for key in alike if rows.size and self._pending[key][3].ctypes.data == rows.ctypes.data]
        if not same and not alike:
            raise SparsaError("moe.all_to_all_wait: these rows are not those of an exchange begun on this rank")
        return (same or alike)[0]

    def _count(self, data: np.ndarray, sends: list[int], receives: list[int]) -> dict[str, Any] | None:
        """Add one exchange's bytes to the counters; its entry (None for the row counts themselves)."""
        row = data.itemsize * int(np.prod(data.shape[1:]))
        c = self.counters
        if data.ndim == 1 and sends == [1] * self.size:
            c.count_bytes += row * (self.size - 1) * 2
            return None
        mine = sends[self.rank] * row
        sent, received = sum(sends) * row - mine, sum(receives) * row - mine
        c.sent_bytes += sent
        c.received_bytes += received
        c.local_bytes += mine
        c.exchanges.append({"row_bytes": row, "sent_bytes": sent, "received_bytes": received, "seconds": 0.0,
                            "waited_seconds": 0.0})
        return c.exchanges[-1]


def sharded_params(module: Module) -> dict[str, int]:
    """Weights split over the ranks (name -> ranks): those `shard-experts` made each rank load a block of."""
    return {op.name: op.shards for op in module.walk() if isinstance(op, ParamOp) and op.shards is not None}


def check_sharded(module: Module, ranks: int) -> None:
    """A SparsaError unless every MoE of the module was split over the ranks."""
    left = next((op for op in module.walk() if isinstance(op, MoeOp)), None)
    if left is not None:
        raise SparsaError("expert parallel: this moe's expert body is not a chain of expert matmuls and "
                          "elementwise ops that fuse-moe-dispatch can lower, so its experts cannot be split over "
                          f"{ranks} ranks", left.loc)
    if not any(isinstance(op, ExchangePlanOp) for op in module.walk()):
        raise SparsaError("expert parallel: the model has no moe whose experts could be split over the ranks")


def block_specs(specs: Mapping[str, WeightSpec], shards: Mapping[str, int]) -> dict[str, WeightSpec]:
    """The weights one rank holds: a sharded one as its block of experts."""
    out = dict(specs)
    for name, ranks in shards.items():
        s = specs[name]
        t = s.type
        out[name] = WeightSpec(name, TensorType(t.dtype, (t.shape[0] // ranks,) + t.shape[1:]), s.layout, s.loc)
    return out


def shard_weights(arrays: Mapping[str, np.ndarray], specs: Mapping[str, WeightSpec], shards: Mapping[str, int],
                  rank: int) -> dict[str, np.ndarray]:
    """Weights with every sharded one given in full (every rank's experts) cut to this rank's block; one given as
    the block already, or mis-shaped, is left for the weight check."""
    out = dict(arrays)
    for name, ranks in shards.items():
        a, full = out.get(name), specs[name].type.shape
        if a is not None and np.ndim(a) == len(full) and np.shape(a)[0] == full[0] and ranks > 1:
            n = full[0] // ranks
            out[name] = a[rank * n:(rank + 1) * n]
    return out
