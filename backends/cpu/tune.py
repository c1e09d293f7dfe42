"""The bounded tuner of the cpu target's register tile: on first use on a machine it times a few candidate
tiles on a matmul of grouped-GEMM chunk shape (64-row blocks; the attention and grouped-GEMM tiles are the
same register tiles) and keeps the fastest, in a JSON file per CPU model and feature set under the cache
directory. About a second in all, said on stderr while it runs; SPARSA_AUTOTUNE=0 turns it off (the derived
tile of target.py is used). It runs when the host's tile is first asked for, at compile time, never inside
a call; `bench/cpu.py` asks before it times anything.

The candidates are the derived tile (target.py's rule) and the next tiles that fit the register file, most
accumulators first; the derived tile wins ties: it is only replaced by one measured faster by more than the noise
(TIE), so a quiet machine and a busy one choose alike where the candidates are alike. A register tile is a
property of one core: the candidates run on one thread (a team of threads on a busy machine waits on its
slowest member: 20x swings were seen under a parallel test run), in rounds that run each candidate in turn (a
burst of load then hits them all), and each keeps its fastest run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from sparsa.backends.cpu.target import CpuTarget

BUDGET_S = 2.0  # for all candidates, compiling included
TIE = 0.05  # a candidate must be this much faster than the derived tile to replace it
MAX_CANDIDATES = 3
_SHAPE = (256, 512, 256)  # m, k, n: four 64-row blocks, a k that streams B's panel from L1/L2


def enabled() -> bool:
    return os.environ.get("SPARSA_AUTOTUNE", "1") != "0"


def candidates(target: CpuTarget) -> list[tuple[int, int]]:
    """The derived tile first, then the other tiles that fit, most accumulators first (MAX_CANDIDATES)."""
    others = sorted((t for t in target.fitting_tiles() if t != target.derived_tile),
                    key=lambda t: (-t[0] * t[1], -t[0]))
    return [target.derived_tile, *others][:MAX_CANDIDATES]


def _path(target: CpuTarget) -> Path | None:
    from sparsa.backends.cpu.cache import cache_dir

    folder = cache_dir()
    if folder is None:
        return None
    digest = hashlib.sha256(f"{target.cpu}|{target.features}|{target.vector_registers}".encode()).hexdigest()[:16]
    return folder / f"tile-{target.cpu or 'generic'}-{digest}.json"


def stored(target: CpuTarget) -> tuple[int, int] | None:
    """The tile tuned earlier on this CPU model, if any (a file that does not parse is ignored)."""
    path = _path(target)
    if path is None or not path.is_file():
        return None
    try:
        tile = tuple(json.loads(path.read_text())["tile"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return tile if tile in candidates(target) else None  # type: ignore[return-value]


def tune(target: CpuTarget, budget_s: float = BUDGET_S, say: bool = True) -> tuple[int, int]:
    """Time the candidates (within `budget_s`), store the winner for this CPU model, return it."""
    import sparsa
    from sparsa.backends.cpu.jit import CpuFunction

    start = time.perf_counter()
    tiles = candidates(target)
    if say:
        print(f"sparsa: tuning the cpu register tile for {target.cpu} ({len(tiles)} candidates, at most "
              f"{budget_s:.0f} s, once per machine; SPARSA_AUTOTUNE=0 skips)", file=sys.stderr, flush=True)
    m, k, n = _SHAPE
    src = f"model M(x: f32[{m}, {k}], w: f32[{k}, {n}]) -> f32[{m}, {n}] {{\n    return x @ w\n}}\n"
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((m, k)).astype(np.float32), rng.standard_normal((k, n)).astype(np.float32)
    built = {}
    for tile in tiles:  # compiling takes most of the budget
        if built and time.perf_counter() - start > budget_s / 2:
            break
        func = sparsa.compile(src, target="reference", passes="canonicalize").module.funcs[-1]
        built[tile] = CpuFunction(func, target=target.with_tile(tile))
    runs: dict[tuple[int, int], list[float]] = {tile: [] for tile in built}
    with _one_thread():
        for fn in built.values():
            fn([x, w], None, {})
        rounds = 0
        while rounds < 5 or (rounds < 50 and time.perf_counter() - start < budget_s):
            for tile, fn in built.items():
                t = time.perf_counter()
                fn([x, w], None, {})
                runs[tile].append(time.perf_counter() - t)
            rounds += 1
    times = {tile: min(r) for tile, r in runs.items()}
    derived = times[target.derived_tile]
    winner = min(times, key=times.get)  # type: ignore[arg-type]
    if times[winner] > derived * (1 - TIE):
        winner = target.derived_tile
    _store(target, winner, times, time.perf_counter() - start)
    if say:
        print(f"sparsa: register tile {winner[0]}x{winner[1]} ("
              + ", ".join(f"{a}x{b} {1e3 * t:.2f} ms" for (a, b), t in times.items()) + ")",
              file=sys.stderr, flush=True)
    return winner


@contextlib.contextmanager
def _one_thread():
    """SPARSA_NUM_THREADS=1 while the candidates run (tuning happens at compile time, before any call)."""
    before = os.environ.get("SPARSA_NUM_THREADS")
    os.environ["SPARSA_NUM_THREADS"] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("SPARSA_NUM_THREADS", None)
        else:
            os.environ["SPARSA_NUM_THREADS"] = before


def _store(target: CpuTarget, tile: tuple[int, int], times: dict, seconds: float) -> None:
    path = _path(target)
    if path is None:
        return
    record: dict[str, Any] = {"cpu": target.cpu, "tile": list(tile), "seconds": round(seconds, 3),
                              "ms": {f"{a}x{b}": round(1e3 * t, 4) for (a, b), t in times.items()}}
    with contextlib.suppress(OSError):  # a cache that cannot be written only costs tuning again
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(record, f)
        os.replace(tmp, path)
