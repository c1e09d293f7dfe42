"""The arrays a compiled cpu function returns, from a pool of reused memory.

A call's results are new arrays, and fresh memory costs a page fault per 4 KiB the first time it is written
(an 8 MB result: ~2 ms, as much as the kernel that fills it; a MoE layer's forward and backward return ~100 MB).
glibc hands large blocks back to the system as they are freed, so every call paid it again. Here a large
result's memory goes back to a pool when the array, and every view of it, is gone, and the next result of the
same size takes it: a training loop's gradients and saved activations reuse the last step's memory, as PyTorch's
caching allocators do on GPUs. The pool holds at most `LIMIT` bytes of memory nobody uses; small arrays come
from malloc, which reuses them without faults."""

from __future__ import annotations

import math

import numpy as np

SMALLEST = 1 << 18  # bytes: smaller results are plain np.empty (below glibc's mmap threshold, reused already)
LIMIT = 1 << 30  # bytes of free memory the pool keeps at most; what would pass it goes back to the system

_free: dict[int, list[np.ndarray]] = {}  # bytes -> free buffers of that size
_held = [0]  # bytes in _free


class _Lease:
    """One result's memory (`buf`), lent out as the array NumPy builds on this object (its base): when the
    array and its views are collected, so is this, and the memory goes back to the pool."""

    __slots__ = ("buf", "__array_interface__")

    def __init__(self, buf: np.ndarray, shape: tuple[int, ...], dtype: np.dtype):
        self.buf = buf
        self.__array_interface__ = {"shape": shape, "typestr": dtype.str, "version": 3,
                                    "data": (buf.ctypes.data, False)}

    def __del__(self) -> None:
        n = self.buf.nbytes
        if _held[0] + n <= LIMIT:  # (list and dict operations are atomic under the GIL: no lock to deadlock on)
            _free.setdefault(n, []).append(self.buf)
            _held[0] += n


ALIGN = 64  # bytes: a cache line (and an AVX-512 vector)


def aligned(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """np.empty starting on a cache line. glibc's large blocks start 16 bytes past a page, so every 64-byte vector
    load from a plain np.empty array spans two cache lines (a packed weight's GEMM: ~12% slower)."""
    dtype = np.dtype(dtype)
    n = math.prod(shape) * dtype.itemsize
    buf = np.empty(n + ALIGN, np.uint8)
    at = -buf.ctypes.data % ALIGN
    return buf[at:at + n].view(dtype).reshape(shape)


def empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An uninitialized C-contiguous array of a NumPy dtype, its memory reused from a result that is gone where
    one of the same size is free (at every call: a few hundred nanoseconds for a small one)."""
    if not isinstance(dtype, np.dtype):
        dtype = np.dtype(dtype)
    n = math.prod(shape) * dtype.itemsize
    if n < SMALLEST:
        return np.empty(shape, dtype)
    free = _free.get(n)
    try:
        buf = free.pop() if free else None
    except IndexError:  # another thread took the last one
        buf = None
    if buf is None:
        buf = aligned((n,), np.uint8)
    else:
        _held[0] -= n
    return np.asarray(_Lease(buf, tuple(shape), dtype))
