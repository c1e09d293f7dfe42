"""Expert parallel on local processes against one process: `python bench/expert_parallel.py [--world 2]`.

One process runs every token with all the cores; then WORLD processes (gloo on 127.0.0.1, the cores shared out
among them) each run their share of the tokens with their block of the experts. Reported: the median call time
of each (the slowest rank's per call), and per rank the bytes sent against the deduplicated minimum (one row per
token and other rank it has experts on) and against one row per assignment (no deduplication). On one machine
the exchange is a copy through loopback sockets: this measures the software path, not a network.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

MODEL = str(Path(__file__).resolve().parent.parent / "examples" / "mixtral_moe.sp")


def machine() -> str:
    flags = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                flags = line
                break
    isa = "AVX-512" if " avx512f" in flags else "AVX2" if " avx2" in flags else "baseline"
    return f"{isa}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}"


def inputs(tokens: int, dim: int) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((tokens, dim)).astype(np.float32)


def timed(fn, reps: int, sync=lambda: None) -> float:
    fn()
    times = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def rank_main(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    import sparsa

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{args.port}", rank=args.rank,
                            world_size=args.world, timeout=datetime.timedelta(seconds=300))
    m = sparsa.compile(args.model, target="cpu", expert_parallel=dist.group.WORLD, passes=pipeline(args))
    m.init_weights(0)
    x = np.array_split(inputs(args.tokens, m.input_types[0].shape[1]), args.world)[args.rank]
    per_call = []
    for _ in range(args.reps + 1):
        dist.barrier()
        t0 = time.perf_counter()
        m(x)
        mine = torch.tensor([time.perf_counter() - t0])
        dist.all_reduce(mine, op=dist.ReduceOp.MAX)  # a call takes as long as its slowest rank
        per_call.append(float(mine))
    stats = m.stats()["all_to_all"]
    Path(args.out, f"rank{args.rank}.json").write_text(json.dumps({"time": statistics.median(per_call[1:]),
                                                                    "stats": stats}))
    dist.destroy_process_group()


def pipeline(args: argparse.Namespace) -> str | None:
    """The cpu pipeline with shard-experts as the flags ask (None: the default, overlapped, not own-first)."""
    if not (args.own_first or args.no_overlap):
        return None
    from sparsa.backends.cpu.backend import CpuBackend
    from sparsa.passes.pipelines import expert_parallel_pipeline

    steps = expert_parallel_pipeline(CpuBackend.PIPELINE, args.world)
    if args.own_first:
        steps = steps.replace("shard-experts{ranks", "shard-experts{own_first=true,ranks")
    if args.no_overlap:
        steps = steps.replace(",overlap-exchanges", "")
    return steps


def minimum(x: np.ndarray, gate: np.ndarray, k: int, world: int) -> tuple[list[int], list[int]]:
    """Per rank: rows to other ranks deduplicated (one per token and rank) and one per assignment."""
    experts = np.argsort(-(x.astype(np.float64) @ gate.astype(np.float64)), axis=-1, kind="stable")[:, :k]
    per = gate.shape[1] // world
    dedup, flat = [], []
    for r, part in enumerate(np.array_split(experts, world)):
        owners = part // per
        dedup.append(sum(len(set(row.tolist()) - {r}) for row in owners))
        flat.append(int((owners != r).sum()))
    return dedup, flat


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--model", default=MODEL)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--own-first", action="store_true", help="shard-experts{own_first=true}")
    p.add_argument("--no-overlap", action="store_true", help="without overlap-exchanges")
    p.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.rank is not None:
        rank_main(args)
        return
    import sparsa

    print(f"machine: {machine()}")
    one = sparsa.compile(args.model, target="cpu").init_weights(0)
    D = one.input_types[0].shape[1]
    x = inputs(args.tokens, D)
    t_one = timed(lambda: one(x), args.reps)
    print(f"one process, {os.cpu_count()} threads, T={args.tokens}: {1e3 * t_one:.1f} ms per call")
    with tempfile.TemporaryDirectory() as out, socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        threads = str(max(1, (os.cpu_count() or 1) // args.world))
        env = dict(os.environ, SPARSA_NUM_THREADS=threads, OMP_NUM_THREADS=threads)
        flags = [f for f, on in (("--own-first", args.own_first), ("--no-overlap", args.no_overlap)) if on]
        procs = [subprocess.Popen([sys.executable, __file__, "--world", str(args.world), "--tokens", str(args.tokens),
                                   "--model", args.model, "--reps", str(args.reps), "--rank", str(r), "--port",
                                   str(port), "--out", out, *flags], env=env) for r in range(args.world)]
        for proc in procs:
            if proc.wait(timeout=900):
                raise SystemExit(f"a rank failed (exit {proc.returncode})")
        ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(args.world)]
    t_ep = ranks[0]["time"]
    print(f"{args.world} processes, {threads} thread(s) each, T={args.tokens} split evenly: {1e3 * t_ep:.1f} ms per "
          f"call (slowest rank), {t_one / t_ep:.2f}x one process")
    dedup, flat = minimum(x, one.weights["gate"], 2, args.world)
    row = D * 4
    print(f"{'rank':>4} {'token bytes sent':>17} {'dedup minimum':>14} {'one per assignment':>19} "
          f"{'all bytes sent':>15} {'received':>10}")
    for r, info in enumerate(ranks):
        s = info["stats"]
        tokens = s["exchanges"][0]["sent_bytes"]
        print(f"{r:>4} {tokens:>17} {dedup[r] * row:>14} {flat[r] * row:>19} {s['sent_bytes']:>15} "
              f"{s['received_bytes']:>10}")
    s = ranks[0]["stats"]
    ex = s["exchanges"]
    moved = sum(e["sent_bytes"] + e["received_bytes"] for e in ex)
    waited = sum(e["waited_seconds"] for e in ex)
    print(f"rank 0, last call: count exchange {1e6 * s['count_seconds']:.0f} us; {len(ex)} row exchanges of "
          f"{moved / 1e6:.2f} MB in and out; begun to arrived (ms): "
          f"{', '.join('%.2f' % (1e3 * e['seconds']) for e in ex)}; blocked waiting {1e3 * waited:.2f} ms in all")


if __name__ == "__main__":
    main()
