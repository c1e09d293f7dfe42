"""Runs a cpu function compiled for another machine where that machine is: its object code linked with
backends/cpu/runner.c by a C compiler for it, and the call (`aot.call_image`) made there, under qemu-user where
this machine is of another architecture."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from sparsa.backends.cpu import aot
from sparsa.backends.cpu.target import host_target


def toolchain(arch: str) -> tuple[str, list[str]] | None:
    """(C compiler, launcher) that build and run a static program for `arch` from here: this machine's cc, or
    Debian's cross compiler and qemu-user (`apt-get install gcc-aarch64-linux-gnu qemu-user`); None if absent."""
    if host_target().arch == arch:
        cc = shutil.which("cc") or shutil.which("gcc")
        return (cc, []) if cc else None
    cc, qemu = shutil.which(f"{arch}-linux-gnu-gcc"), shutil.which(f"qemu-{arch}")
    return (cc, [qemu]) if cc and qemu else None


def run_there(fn, inputs, cache, threads: int, folder: Path) -> list:
    """One call of `fn` made by runner.c linked with fn's object code, on its machine (or qemu): its outputs."""
    cc, launcher = toolchain(fn.target.arch)
    image, outputs = aot.call_image(fn, inputs, cache, threads)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "call.bin").write_bytes(image)
    (folder / "model.o").write_bytes(fn.object_code())
    built = subprocess.run([cc, "-O1", "-static", *(["-fopenmp"] if threads > 1 else []), str(aot.RUNNER),
                            str(folder / "model.o"), "-lm", "-o", str(folder / "runner")], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    done = subprocess.run([*launcher, str(folder / "runner"), str(folder / "call.bin"), str(folder / "results.bin"), "3"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("median_ns ")
    return aot.read_results((folder / "results.bin").read_bytes(), outputs)
