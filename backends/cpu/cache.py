"""A disk cache of compiled cpu kernels: the native object code MLIR's ExecutionEngine produced, keyed by the
kernels' MLIR, the schedule, the pipeline, the backend's own sources and the versions of Sparsa, MLIR
(torch-mlir), llvmlite and the host CPU. A hit loads the object with llvmlite's MCJIT (milliseconds) instead of
scheduling, lowering and running LLVM again. Entries are written to a temporary file and renamed, so concurrent
processes never see half an entry; an entry whose object does not match its recorded SHA-256, or that fails to
load, is rebuilt."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import json
import os
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

from sparsa.knobs import cache_root

FORMAT = 1


def cache_dir() -> Path | None:
    """The cpu entries: `cpu/` under the cache root (knobs.cache_root), or None when there is none to use."""
    root = cache_root()
    return None if root is None else root / "cpu"


@functools.cache
def code_digest(folder: Path = Path(__file__).parent) -> str:
    """SHA-256 of the cpu backend's sources (every .py and .c file in `folder`). The kernels' MLIR, the schedule
    and the host program are in the key as text, but what the backend does to them after (the rewrites between the
    schedule and the pipeline, the LLVM flags, the loader) is code: an install of another commit with the same
    version number (from git, or an editable one being worked on) must not load objects the old code built."""
    h = hashlib.sha256()
    for path in sorted(p for p in folder.iterdir() if p.suffix in (".py", ".c")):
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "?"


def key(*texts: str) -> str:
    """The entry name for this code on this machine and these versions, and this backend's code (`code_digest`)."""
    import llvmlite.binding as llvm

    from sparsa import __version__

    h = hashlib.sha256()
    machine = (llvm.get_host_cpu_name(), llvm.get_host_cpu_features().flatten())
    for part in (f"format {FORMAT}", __version__, code_digest(), _version("torch-mlir"), _version("llvmlite"),
                 *machine, *texts):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:32]


class Loaded:
    """Kernels loaded from a cached object: `lookup(name)` gives a packed entry point's address."""

    def __init__(self, engine: Any, keep: Any):
        self.engine = engine
        self._keep = keep

    def raw_lookup(self, symbol: str) -> int:
        return self.engine.get_function_address("_mlir_" + symbol)


def load(name: str) -> tuple[Loaded, dict[str, str]] | None:
    """(the loaded kernels, the stages' text) for a good entry, else None (missing, stale or corrupt)."""
    folder = cache_dir()
    if folder is None:
        return None
    meta_path, obj_path = folder / f"{name}.json", folder / f"{name}.o"
    try:
        meta = json.loads(meta_path.read_text())
        data = obj_path.read_bytes()
        if meta.get("format") != FORMAT or hashlib.sha256(data).hexdigest() != meta.get("sha256"):
            return None
        engine = _mcjit(data)
        for symbol in meta["symbols"]:
            if not engine.get_function_address("_mlir_" + symbol):
                return None
        return Loaded(engine, data), meta["stages"]
    except (OSError, ValueError, KeyError, RuntimeError, TypeError):
        return None


def store(name: str, engine: Any, stages: dict[str, str], symbols: list[str]) -> None:
    """Write the engine's object code and the stages as one entry (atomically; failures only cost the cache)."""
    folder = cache_dir()
    if folder is None:
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            obj = Path(tmp) / "k.o"
            engine.dump_to_object_file(str(obj))
            data = obj.read_bytes()
            meta = {"format": FORMAT, "sha256": hashlib.sha256(data).hexdigest(), "symbols": symbols,
                    "stages": stages}
            _atomic_write(folder / f"{name}.o", data)
            _atomic_write(folder / f"{name}.json", json.dumps(meta).encode())
    except OSError:
        return


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


_native_ready = False


def _mcjit(data: bytes) -> Any:
    """An llvmlite MCJIT engine holding the object code; its calls to libc and libm resolve in this process."""
    global _native_ready
    import llvmlite.binding as llvm

    if not _native_ready:
        llvm.initialize_native_target()
        llvm.initialize_native_asmprinter()
        ctypes.CDLL("libm.so.6", mode=ctypes.RTLD_GLOBAL)
        _native_ready = True
    tm = llvm.Target.from_default_triple().create_target_machine()
    engine = llvm.create_mcjit_compiler(llvm.parse_assembly(""), tm)
    engine.add_object_file(llvm.ObjectFileRef.from_data(data))
    engine.finalize_object()
    return engine
