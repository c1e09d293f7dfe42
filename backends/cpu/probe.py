"""What this machine can do, measured: the FMA peak of one core through the same MLIR -> LLVM JIT the kernels
use (a loop of independent vector multiply-adds at the target's vector width), and the copy bandwidth. The
benchmarks judge the kernels against these."""

from __future__ import annotations

import ctypes
import time
from typing import Any

import numpy as np

from sparsa.backends.cpu.target import CpuTarget, host_target

ACCUMULATORS = 12  # independent chains: more than an FMA's latency x its issue rate on any current core

_FMA = """
func.func @fma(%n: index) -> f32 attributes {{llvm.emit_c_interface}} {{
  %c0 = arith.constant 0 : index
  %c1 = arith.constant 1 : index
  %a = arith.constant dense<0.999999> : vector<{lanes}xf32>
  %b = arith.constant dense<0.001> : vector<{lanes}xf32>
{inits}
  %r:{acc} = scf.for %i = %c0 to %n step %c1 iter_args({args}) -> ({types}) {{
{body}
    scf.yield {ys} : {types}
  }}
{sums}
  return %s{last} : f32
}}
"""


def _fma_module(lanes: int) -> str:
    vt = f"vector<{lanes}xf32>"
    acc = ACCUMULATORS
    # each chain from its own start, none a fixed point of x * a + b (LLVM would fold a constant chain)
    inits = "\n".join(f"  %z{i} = arith.constant dense<{0.5 + i / 64}> : {vt}" for i in range(acc))
    args = ", ".join(f"%x{i} = %z{i}" for i in range(acc))
    body = "\n".join(f"    %y{i} = vector.fma %x{i}, %a, %b : {vt}" for i in range(acc))
    sums = [f"  %s0 = vector.reduction <add>, %r#0 : {vt} into f32"]
    for i in range(1, acc):
        sums.append(f"  %t{i} = vector.reduction <add>, %r#{i} : {vt} into f32")
        sums.append(f"  %s{i} = arith.addf %s{i - 1}, %t{i} : f32")
    return _FMA.format(lanes=lanes, inits=inits, acc=acc, args=args, types=", ".join([vt] * acc), body=body,
                       ys=", ".join(f"%y{i}" for i in range(acc)), sums="\n".join(sums), last=acc - 1)


def fma_peak_gflops(target: CpuTarget | None = None, seconds: float = 0.2) -> float:
    """Single-core float32 GFLOP/s of multiply-adds at the target's vector width (it must run here)."""
    from torch_mlir import execution_engine, ir, passmanager

    from sparsa.backends.cpu.jit import PIPELINE, _for_target

    target = target or host_target()
    with ir.Context(), ir.Location.unknown():
        module = ir.Module.parse(_fma_module(target.lanes()))
        passmanager.PassManager.parse(PIPELINE).run(module.operation)
        _for_target(module, target)
        engine = execution_engine.ExecutionEngine(module, opt_level=2)
        packed = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(engine.raw_lookup("_mlir_ciface_fma"))

        def fn(n: int) -> float:  # the packed convention: pointers to the argument, then to the result
            arg, out = ctypes.c_int64(n), ctypes.c_float()
            slots = (ctypes.c_void_p * 2)(ctypes.addressof(arg), ctypes.addressof(out))
            packed(ctypes.addressof(slots))
            return out.value

        fn(1000)
        n = 1 << 16
        while True:  # grow until one run takes a good part of the budget
            t = time.perf_counter()
            fn(n)
            dt = time.perf_counter() - t
            if dt > seconds / 4 or n > 1 << 34:
                break
            n *= 2
        best = min(_timed(fn, n) for _ in range(3))
    return 2 * ACCUMULATORS * target.lanes() * n / best / 1e9


def _timed(fn: Any, n: int) -> float:
    t = time.perf_counter()
    fn(n)
    return time.perf_counter() - t


def copy_bandwidth_gbs(mib: int = 256) -> float:
    """GB/s of one thread copying `mib` MiB (read + write counted), best of 3: what a kernel that streams its
    operands once, as decode does, can reach."""
    src = np.ones(mib << 18, np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    best = min(_copy(dst, src) for _ in range(3))
    return 2 * src.nbytes / best / 1e9


def _copy(dst: np.ndarray, src: np.ndarray) -> float:
    t = time.perf_counter()
    np.copyto(dst, src)
    return time.perf_counter() - t
