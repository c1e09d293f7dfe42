"""The host's threads: how many the kernels split their work over, the pool that runs the parts, and the
work estimate below which an op stays on one thread."""

from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from sparsa.ir.core import Operation
from sparsa.ir.diagnostics import SparsaError
from sparsa.ir.dialects import moe as M
from sparsa.ir.dialects import tensor_reduce as R
from sparsa.ir.dialects import tensor_shape as S

# Work (elements touched; a matmul's multiply-adds / 32, as vectorized) below which an op runs on one thread:
# handing half of it to another thread costs ~0.15 ms here (silu of 256x1024: 0.16 ms on one thread, 0.27 on
# two; 4096x1024: 1.95 and 1.13; a router's 1024x512 @ 512x8: 0.46 and 0.75).
SPLIT_WORK = 1 << 20
_pool: ThreadPoolExecutor | None = None


def num_threads() -> int:
    """Threads the kernels split their work over: SPARSA_NUM_THREADS, default every core."""
    value = os.environ.get("SPARSA_NUM_THREADS", "")
    if value:
        try:
            return max(1, int(value))
        except ValueError:
            raise SparsaError(f"SPARSA_NUM_THREADS must be a whole number, got {value!r}") from None
    return _cores()


@functools.cache
def _cores() -> int:
    """The cores this process may run on (the target's count: its CPU affinity, not every core of the host)."""
    from sparsa.backends.cpu.target import host_target

    return host_target().cores or 1


def _threads(n: int) -> ThreadPoolExecutor:
    global _pool
    if _pool is None or _pool._max_workers < n:
        _pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="sparsa-cpu")
    return _pool


def work(op: Operation, ins: list[np.ndarray], out: np.ndarray) -> int:
    """An op's work in the units of SPLIT_WORK: elements touched; a matmul's multiply-adds / 32 (they are
    vectorized); a topk's compares (its input times k); a router's compares and exps."""
    if isinstance(op, S.MatmulOp):
        return out.size * ins[0].shape[-1] // 32
    if isinstance(op, R.TopkOp):
        return ins[0].size * op.k
    if isinstance(op, M.RouteOp):  # an exp (float64) costs about as much as 16 compares
        return ins[0].size * (op.k + 16)
    return max(a.size for a in ins + [out])


def together(jobs: list) -> None:
    """Run the jobs at once: all but the last on the pool, the last on this thread (a wake-up fewer)."""
    pending = [_threads(len(jobs)).submit(j) for j in jobs[:-1]]
    jobs[-1]()
    for f in pending:
        f.result()


def transposed(*arrays: np.ndarray) -> list[np.ndarray]:
    """Each array with its last two dims swapped, contiguous: copied in slabs of its leading dims on the kernel
    threads at once (what the attention kernels read K^T, Q^T, V^T and dO^T from; one thread copies 4 MB of heads
    in 1.3-2.6 ms)."""
    outs = [np.empty(a.shape[:-2] + (a.shape[-1], a.shape[-2]), a.dtype) for a in arrays]
    jobs = []
    n = num_threads()
    for a, o in zip(arrays, outs, strict=True):
        src, dst = a.reshape(-1, *a.shape[-2:]), o.reshape(-1, *o.shape[-2:])
        bounds = sorted({len(src) * p // n for p in range(n + 1)})
        jobs += [lambda s=src[lo:hi], d=dst[lo:hi]: np.copyto(d, np.swapaxes(s, -1, -2))
                 for lo, hi in zip(bounds, bounds[1:], strict=False)]
    if len(jobs) == 1:
        jobs[0]()
    elif jobs:
        together(jobs)
    return outs
