"""The host's threads: how many the kernels split their work over, the pool that runs the parts, and the
work estimate below which an op stays on one thread."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import glob
import importlib.util
import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from sparsa.ir.core import Operation
from sparsa.ir.diagnostics import SparsaError
from sparsa.ir.dialects import moe as M
from sparsa.ir.dialects import tensor_reduce as R
from sparsa.ir.dialects import tensor_shape as S
from sparsa.knobs import env

# Work (elements touched; a matmul's multiply-adds / 32, as vectorized) below which an op runs on one thread:
# handing half of it to another thread costs ~0.15 ms here (silu of 256x1024: 0.16 ms on one thread, 0.27 on
# two; 4096x1024: 1.95 and 1.13; a router's 1024x512 @ 512x8: 0.46 and 0.75).
SPLIT_WORK = 1 << 20
# The same for the native host (host.py), whose OpenMP team starts a region in about 1 us (GOMP_parallel on two
# spinning threads here) rather than the ~150 us of handing Python work to a pool thread.
NATIVE_SPLIT_WORK = 1 << 15
# Row splits under SPARSA_DETERMINISTIC=1 fall at multiples of this many rows (the matmul's row block, a multiple
# of its register tile), so no row moves between a full tile and the remainder loop with the thread count.
DETERMINISTIC_ROWS = 64
_pool: ThreadPoolExecutor | None = None


def num_threads() -> int:
    """Threads the kernels split their work over: SPARSA_NUM_THREADS, default every core."""
    value = env("SPARSA_NUM_THREADS")
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


def work(op: Operation, ins: list[tuple[int, ...]], out: tuple[int, ...]) -> int:
    """An op's work (from its operands' and result's shapes) in the units of SPLIT_WORK: elements touched; a
    matmul's multiply-adds / 32 (they are vectorized); a topk's compares (its input times k); a router's
    compares and exps."""
    size = [math.prod(s) for s in ins]
    if isinstance(op, S.MatmulOp):
        return math.prod(out) * ins[0][-1] // 32
    if isinstance(op, R.TopkOp):
        return size[0] * op.k
    if isinstance(op, M.RouteOp):  # an exp (float64) costs about as much as 16 compares
        return size[0] * (op.k + 16)
    return max(size + [math.prod(out)])


def one_part_below(op: Operation) -> bool:
    """Whether a kernel split in parts runs as one part below the split work (a topk's, a router's, a view's
    copy, a concat, a transpose, a gather: their parts split no GEMM, so a few rows are not worth waking the
    threads)."""
    return isinstance(op, R.TopkOp | M.RouteOp | S.SliceOp | S.SplitOp | S.BroadcastToOp | S.ConcatOp | S.TransposeOp
                      | S.GatherOp)


def row_bounds(m: int, n: int, exact: bool) -> list[int]:
    """Where n slabs of m rows start and end; with `exact` (SPARSA_DETERMINISTIC=1) at multiples of
    DETERMINISTIC_ROWS, so each row lands in the same kind of register tile whatever the thread count."""
    bounds = [m * p // n for p in range(n + 1)]
    if exact:
        bounds = sorted({min(m, -(-b // DETERMINISTIC_ROWS) * DETERMINISTIC_ROWS) for b in bounds})
    return bounds


def together(jobs: list) -> None:
    """Run the jobs at once: all but the last on the pool, the last on this thread (a wake-up fewer)."""
    pending = [_threads(len(jobs)).submit(j) for j in jobs[:-1]]
    jobs[-1]()
    for f in pending:
        f.result()


def transposed(*arrays: np.ndarray) -> list[np.ndarray]:
    """Each array with its last two dims swapped, contiguous: copied in slabs of its leading dims on the kernel
    threads at once (what attention's backward reads Q^T and dO^T from; one thread copies 4 MB of heads
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


@functools.cache
def openmp_parallel() -> int:
    """The address of libgomp's GOMP_parallel, the entry the native host starts its parallel regions through
    (0 when no libgomp loads: every region then runs on the calling thread). The copy torch ships comes first,
    so that Sparsa's kernels and torch's share one OpenMP team; else the system's."""
    spec = importlib.util.find_spec("torch")
    found = []
    for folder in (spec.submodule_search_locations or []) if spec else []:
        found += sorted(glob.glob(os.path.join(folder, "lib", "libgomp*.so*")))
    system = ctypes.util.find_library("gomp")
    for path in found + ([system] if system else []):
        try:
            return ctypes.cast(ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL).GOMP_parallel, ctypes.c_void_p).value or 0
        except (OSError, AttributeError):
            continue
    return 0
