"""Every debugging switch and environment variable of Sparsa, declared once.

Each knob has a command-line flag (for `sparsa opt` / `sparsa compile`) and an
environment variable (for library use, e.g. under `torch.compile`); the flag wins.

Environment-only variables, read where they act:
- SPARSA_LOG=fallbacks: the torch.compile backend names each op it leaves to PyTorch (runtime/torch_backend.py).
- SPARSA_CACHE_DIR: where generated Triton kernels (backends/triton/attention.py) and compiled cpu kernels
  (backends/cpu/cache.py, under cpu/) are kept; default ~/.cache/sparsa. A directory another user owns or
  can write to is refused (said once): compiled code then goes nowhere shared. Nothing in it is unpickled.
- SPARSA_NUM_THREADS: threads the cpu target's kernels split their work over; default every core.
- SPARSA_DETERMINISTIC=1: the cpu target splits work at fixed places and sums partial results in a fixed
  order, so results are bitwise identical over calls and thread counts (`deterministic()`).
- SPARSA_NATIVE_HOST=0: cpu functions compiled while it is set run their kernels from a Python loop over the
  ops instead of one native call (`native_host()`; for comparison and debugging).
- SPARSA_PROFILE=1: cpu functions compiled while it is set time each kernel their native host runs (with the
  checks, zeroing and sums around it); `CompiledModel.profile()` prints the table (`profile()`).
- TRITON_INTERPRET=1: Triton's own switch to run kernels on the CPU (set by tests/conftest.py without a GPU).
"""

from __future__ import annotations

import functools
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

# POSIX keeps os.environ's variables in this dict of bytes, in step with every change made through os.environ
_ENVIRON = getattr(os.environ, "_data", None) if os.name == "posix" else None


def env(name: str, default: str = "") -> str:
    """os.environ.get(name, default), without its key encoding and mapping layers: 0.04 us instead of 0.6 (a
    compiled model reads two variables per call; a 16x32 model's whole call is under 10 us)."""
    if _ENVIRON is None:
        return os.environ.get(name, default)
    value = _ENVIRON.get(name.encode())
    return default if value is None else os.fsdecode(value)


def deterministic() -> bool:
    """SPARSA_DETERMINISTIC=1: fixed partitions of work and a fixed order of reduction (see the docstring)."""
    return env("SPARSA_DETERMINISTIC") not in ("", "0")


def native_host() -> bool:
    """Whether the cpu target compiles a function's host into native code (default) or runs its kernels from
    a Python loop (SPARSA_NATIVE_HOST=0)."""
    return os.environ.get("SPARSA_NATIVE_HOST", "") not in ("0", "false", "no")


def profile() -> bool:
    """SPARSA_PROFILE=1: the cpu target's native hosts time each kernel they run (see the docstring)."""
    return os.environ.get("SPARSA_PROFILE", "") not in ("", "0", "false", "no")


# Cache directories already refused in this process (each said once).
_REFUSED: set[str] = set()


def cache_root() -> Path | None:
    """SPARSA_CACHE_DIR, else $XDG_CACHE_HOME/sparsa, else ~/.cache/sparsa (created private to this user), or
    None, with a warning the first time, when it belongs to another user or others can write to it: code
    found there would run as this user, so such a directory is not used."""
    base = os.environ.get("SPARSA_CACHE_DIR")
    path = Path(base) if base else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sparsa"
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        st = path.stat()
    except OSError as e:
        reason = f"cannot be created ({e.strerror})"
    else:
        if hasattr(os, "getuid") and st.st_uid != os.getuid():
            reason = "belongs to another user"
        elif st.st_mode & 0o022:
            reason = "other users can write to it"
        else:
            return path
    if str(path) not in _REFUSED:
        _REFUSED.add(str(path))
        warnings.warn(f"sparsa: not caching compiled code in {path}: it {reason}; compiling without a cache",
                      RuntimeWarning, stacklevel=2)
    return None


@functools.cache
def private_dir() -> Path:
    """A directory of this process's own (mode 0700, removed at exit), for files that must exist on disk when
    no cache directory may be used (Triton reads a kernel's source from its file)."""
    import atexit
    import shutil
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="sparsa-"))
    atexit.register(shutil.rmtree, path, True)
    return path


@dataclass(frozen=True)
class Knob:
    """One switch: its flag, its environment variable, whether it takes a value, and what it does."""

    flag: str
    env: str
    help: str
    takes_value: bool = False
    repeatable: bool = False


KNOBS: tuple[Knob, ...] = (
    Knob("--print-ir-after-all", "SPARSA_PRINT_IR_AFTER_ALL", "print the IR after every pass"),
    Knob("--print-ir-after-change", "SPARSA_PRINT_IR_AFTER_CHANGE",
         "print the IR after every pass that changed it"),
    Knob("--print-ir-before", "SPARSA_PRINT_IR_BEFORE", "print the IR before pass P (comma-separated)", True, True),
    Knob("--print-ir-after", "SPARSA_PRINT_IR_AFTER", "print the IR after pass P (comma-separated)", True, True),
    Knob("--dump-dir", "SPARSA_DUMP_DIR", "write numbered IR snapshots (and backend stages) into DIR", True),
    Knob("--pass-statistics", "SPARSA_PASS_STATISTICS", "print each pass's counters at the end"),
    Knob("--no-verify", "SPARSA_NO_VERIFY", "skip the verifier between passes (debugging only)"),
    Knob("--debug", "SPARSA_DEBUG", "show Python tracebacks for internal errors"),
)


def _dest(k: Knob) -> str:
    return k.flag.lstrip("-").replace("-", "_")


@dataclass
class DebugOptions:
    """The values of the knobs for one compilation (an explicit context object, not a global)."""

    print_ir_after_all: bool = False
    print_ir_after_change: bool = False
    print_ir_before: set[str] = field(default_factory=set)
    print_ir_after: set[str] = field(default_factory=set)
    dump_dir: str | None = None
    pass_statistics: bool = False
    no_verify: bool = False
    debug: bool = False

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> DebugOptions:
        """Options from the SPARSA_* environment variables."""
        env = os.environ if environ is None else environ
        opts = cls()
        for k in KNOBS:
            raw = env.get(k.env)
            if raw is None or raw == "":
                continue
            opts._set(k, raw if k.takes_value else raw not in ("0", "false", "no"))
        return opts

    def update_from_args(self, args: object) -> DebugOptions:
        """Overlay the flags parsed by `add_arguments` (flags win over the environment)."""
        for k in KNOBS:
            value = getattr(args, _dest(k), None)
            if value not in (None, False, []):
                self._set(k, ",".join(value) if isinstance(value, list) else value)
        return self

    def _set(self, k: Knob, value: str | bool) -> None:
        name = _dest(k)
        if k.repeatable:
            getattr(self, name).update(p.strip() for p in str(value).split(",") if p.strip())
        else:
            setattr(self, name, value)


def add_arguments(parser: object) -> None:
    """Add every knob's flag to an argparse parser."""
    for k in KNOBS:
        if k.repeatable:
            parser.add_argument(k.flag, dest=_dest(k), action="append", metavar="P", help=k.help)
        elif k.takes_value:
            parser.add_argument(k.flag, dest=_dest(k), metavar="DIR", help=k.help)
        else:
            parser.add_argument(k.flag, dest=_dest(k), action="store_true", help=k.help)
