"""Expert parallel over real processes: 2 and 4 ranks over gloo on 127.0.0.1 against one process running every
rank's tokens concatenated in rank order; global capacity brute-forced; bytes against the deduplicated minimum."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import sparsa
from sparsa.backends.cpu.backend import CpuBackend
from sparsa.backends.reference.backend import ReferenceBackend
from sparsa.ir.diagnostics import SparsaError
from sparsa.ir.dialects.moe import kept_assignments
from sparsa.ir.dialects.moe_exchange import global_keep, plan
from sparsa.passes.pipelines import expert_parallel_pipeline

pytest.importorskip("torch.distributed")

WORKER = Path(__file__).with_name("ep_worker.py")

HEADER = """
const D = 32
const F = 48
const E = 8
model M(x: f32[T, D]) -> f32[T, D] {
    param gate: f32[D, E]
    param w1: f32[E, D, F]
    param w2: f32[E, F, D]
"""
MOE = HEADER + """    param w3: f32[E, D, F]
    probs = softmax(x @ gate, axis=-1)
    weights, experts = topk(probs, k=K)
    weights = weights / sum(weights, axis=-1, keepdim=true)
    return moe(x, experts, weights CAPACITY) |e, h| {
        (silu(h @ w1[e]) * (h @ w3[e])) @ w2[e]
    }
}
"""


SHARED = HEADER + """    param s1: f32[D, F]
    param s2: f32[F, D]
    weights, experts = topk(softmax(x @ gate, axis=-1), k=2)
    routed = moe(x, experts, weights) |e, h| { silu(h @ w1[e]) @ w2[e] }
    return routed + silu(x @ s1) @ s2
}
"""


def moe_source(k: int = 2, capacity: float | None = None) -> str:
    return MOE.replace("K)", f"{k})").replace(" CAPACITY", "" if capacity is None else f", capacity={capacity}")


def routing(x: np.ndarray, gate: np.ndarray, k: int, capacity: float | None) -> tuple[np.ndarray, np.ndarray]:
    """(experts [T, K], kept [T, K]) as one process routes every token: top-k of softmax(x @ gate), then each
    expert's first ceil(capacity * T * K / E) assignments in token then slot order, counted by hand."""
    logits = x.astype(np.float64) @ gate.astype(np.float64)
    experts = np.argsort(-logits, axis=-1, kind="stable")[:, :k]
    E = gate.shape[1]
    kept = np.ones(experts.shape, dtype=bool)
    if capacity is not None:
        cap = int(np.ceil(capacity * x.shape[0] * k / E))
        seen = [0] * E
        for t in range(experts.shape[0]):
            for j in range(k):
                e = int(experts[t, j])
                kept[t, j] = seen[e] < cap
                seen[e] += 1
    return experts, kept


def minimum_rows(experts: np.ndarray, kept: np.ndarray, splits: list[int], E: int, world: int) -> list[int]:
    """Per rank: token rows it must send to other ranks, each token once per other rank holding one of its
    kept experts (the deduplicated minimum)."""
    out = []
    for r in range(world):
        n = 0
        for t in range(splits[r], splits[r + 1]):
            dests = {int(e) // (E // world) for e, keep in zip(experts[t], kept[t], strict=True) if keep}
            n += len(dests - {r})
        out.append(n)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(world: int, folder: Path, timeout: float = 240) -> None:
    """Run the worker on `world` local processes; each stops by itself, and all are killed past `timeout`."""
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(r), str(world), str(port), str(folder)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(world)]
    try:
        outs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    failed = [(r, p.returncode, o) for r, (p, o) in enumerate(zip(procs, outs, strict=True)) if p.returncode]
    assert not failed, "\n".join(f"rank {r} exited {rc}:\n{o[-3000:]}" for r, rc, o in failed)


def cases(world: int) -> list[dict]:
    splits = {2: [0, 37, 37], 4: [0, 23, 23, 60, 71]}[world]  # a rank with no tokens, uneven counts
    out = []
    for target in ("reference", "cpu"):
        out.append(dict(name=f"top2-{target}", source=moe_source(), target=target, k=2, capacity=None, seed=1))
        out.append(dict(name=f"capacity-{target}", source=moe_source(2, 0.75), target=target, k=2, capacity=0.75,
                        seed=2, repeat=2))
    out.append(dict(name="top4-cpu", source=moe_source(4), target="cpu", k=4, capacity=None, seed=3))
    # a router skewed onto experts 0 and 1 (rank 0's), with capacity: most tokens dropped, one rank busy
    out.append(dict(name="skewed-capacity-cpu", source=moe_source(2, 1.0), target="cpu", k=2, capacity=1.0, seed=4,
                    skew=True, weights=True, blocks=True))
    out.append(dict(name="deterministic-cpu", source=moe_source(), target="cpu", k=2, capacity=None, seed=5,
                    deterministic=True))
    # a shared expert (not split: every rank runs it on its tokens) runs while the token rows are in flight
    out.append(dict(name="shared-cpu", source=SHARED, target="cpu", k=2, capacity=None, seed=7))
    # own-first: a rank's own rows through its experts apart from the others' (bitwise the same, capacity too)
    for target, backend in (("cpu", CpuBackend), ("reference", ReferenceBackend)):
        own = expert_parallel_pipeline(backend.PIPELINE, world).replace("shard-experts{", "shard-experts{own_first=1,")
        out.append(dict(name=f"own-first-{target}", source=moe_source(2, 1.0), target=target, k=2, capacity=1.0,
                        seed=8, deterministic=target == "cpu", passes=own))
    if importlib.util.find_spec("triton") is not None:  # kernels under Triton's interpreter without a GPU
        out.append(dict(name="capacity-triton", source=moe_source(2, 0.75), target="triton", k=2, capacity=0.75,
                        seed=9))
    for c in out:
        c["splits"] = splits
    # reverse mode: the exchange's transpose carries the cotangents back (capacity on, so drops get nothing)
    for target in ("reference", "cpu"):
        out.append(dict(name=f"grad-{target}", source=moe_source(2, 1.0), target=target, k=2, capacity=1.0, seed=11,
                        grad=True, splits=splits))
    # the shared example's whole decoder: four MoE layers (params `layers.i...`), sequences split by batch
    decoder = (Path(__file__).parent.parent / "examples" / "tiny_moe_decoder.sp").read_text()
    out.append(dict(name="decoder-cpu", source=decoder, target="cpu", seed=10, tokens=True, deterministic=True,
                    splits={2: [0, 2, 4], 4: [0, 1, 1, 3, 4]}[world]))
    if importlib.util.find_spec("transformers") is not None:  # transformers' Mixtral block, every rank with tokens
        for how in ("compile", "swap", "swap-frozen"):
            out.append(dict(name=f"torch-{how}", torch=how, target="cpu", k=2, capacity=None, seed=6,
                            splits={2: [0, 9, 25], 4: [0, 9, 25, 28, 40]}[world]))
    return out


def prepare(folder: Path, world: int) -> list[dict]:
    todo = cases(world)
    for c in todo:
        rng = np.random.default_rng(c["seed"])
        x = rng.standard_normal((c["splits"][-1], 32)).astype(np.float32)
        if c.get("tokens"):
            x = rng.integers(0, 1024, size=(c["splits"][-1], 8)).astype(np.int32)
        if c.get("skew"):
            x[:, 0] += 4.0
        np.savez(folder / f"{c['name']}.inputs.npz", x=x, dy=rng.standard_normal(x.shape).astype(np.float32))
        if c.get("weights"):
            m = sparsa.compile(c["source"], target="reference").init_weights(c["seed"])
            w = dict(m.weights)
            w["gate"] = w["gate"].copy()
            w["gate"][0, :2] = [6.0, 5.0]
            np.savez(folder / f"{c['name']}.weights.npz", **w)
    (folder / "cases.json").write_text(json.dumps(todo))
    return todo


def check(folder: Path, world: int, todo: list[dict]) -> None:
    for c in todo:
        if c.get("torch"):
            check_torch(folder, world, c)
            continue
        if c.get("grad"):
            check_grad(folder, world, c)
            continue
        os.environ["SPARSA_DETERMINISTIC"] = "1" if c.get("deterministic") else "0"
        try:
            one = sparsa.compile(c["source"], target=c["target"])  # one process: the target's own pipeline
            if c.get("weights"):
                one.load_weights(folder / f"{c['name']}.weights.npz")
            else:
                one.init_weights(c["seed"])
            x = np.load(folder / f"{c['name']}.inputs.npz")["x"]
            want = one(x)
        finally:
            os.environ.pop("SPARSA_DETERMINISTIC")
        ranks = [np.load(folder / f"{c['name']}.{r}.npz") for r in range(world)]
        got = np.concatenate([r["y"] for r in ranks])
        if c.get("deterministic"):
            assert np.array_equal(got, want), f"{c['name']}: not bitwise equal to one process"
        else:
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=c["name"])
        ir = str(ranks[0]["ir"])
        assert "moe.exchange_plan" in ir and f"shards = {world}" in ir
        if c.get("tokens"):
            assert ir.count("moe.exchange_plan") == 4  # one per layer
            continue
        assert ("moe.rank_rows" in ir) == c["name"].startswith("own-first")
        if c["name"] == "shared-cpu":  # the shared expert runs between the first start and the first wait
            assert ir.index("moe.all_to_all_start") < ir.index("tensor.matmul(%x, %s1)") \
                < ir.index("moe.all_to_all_wait")
        experts, kept = routing(x, one.weights["gate"], c["k"], c["capacity"])
        rows = minimum_rows(experts, kept, c["splits"], 8, world)
        for r in range(world):
            stats = json.loads(str(ranks[r]["stats"]))
            tokens, ids, gates, back = stats["exchanges"]
            assert tokens["row_bytes"] == 32 * 4 and back["row_bytes"] == 32 * 4
            assert tokens["sent_bytes"] == rows[r] * 32 * 4, (c["name"], r, "tokens sent")
            assert back["received_bytes"] == rows[r] * 32 * 4, (c["name"], r, "results back")
            assert ids["sent_bytes"] == rows[r] * c["k"] * 8 and gates["sent_bytes"] == rows[r] * c["k"] * 4
            assert stats["sent_bytes"] == sum(e["sent_bytes"] for e in stats["exchanges"])
        if c["capacity"] is not None:
            assert not kept.all(), f"{c['name']}: capacity dropped nothing; the case tests nothing"


def check_grad(folder: Path, world: int, c: dict) -> None:
    """Each rank's pullback against one process's on every token: x's gradient rank by rank, each expert
    weight's as the rank's block of it, and a replicated weight's (the router) summed over the ranks."""
    one = sparsa.compile(c["source"], target=c["target"]).init_weights(c["seed"])
    data = np.load(folder / f"{c['name']}.inputs.npz")
    y, pullback = one.vjp(data["x"])
    want = pullback(data["dy"])
    ranks = [np.load(folder / f"{c['name']}.{r}.npz") for r in range(world)]
    assert "moe.all_to_all" in str(ranks[0]["ir"]) and "moe.grouped_weight_grad" in str(ranks[0]["ir"])
    np.testing.assert_allclose(np.concatenate([r["y"] for r in ranks]), y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.concatenate([r["d_x"] for r in ranks]), want["x"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(sum(r["d_gate"] for r in ranks), want["gate"], rtol=1e-4, atol=1e-5)
    for name in ("w1", "w2", "w3"):
        np.testing.assert_allclose(np.concatenate([r[f"d_{name}"] for r in ranks]), want[name], rtol=1e-4,
                                   atol=1e-5, err_msg=f"{c['name']}: d{name}")


def check_torch(folder: Path, world: int, c: dict) -> None:
    """The rank outputs against the eager block on every token, and the bytes against the minimum."""
    import torch

    sys.path.insert(0, str(WORKER.parent))
    from ep_worker import mixtral_block

    block = mixtral_block(c["seed"])
    x = np.load(folder / f"{c['name']}.inputs.npz")["x"]
    with torch.no_grad():
        want = block(torch.from_numpy(x)[None])[0].numpy()
        gate = block.gate.weight.numpy().T
    ranks = [np.load(folder / f"{c['name']}.{r}.npz") for r in range(world)]
    np.testing.assert_allclose(np.concatenate([r["y"] for r in ranks]), want, rtol=1e-4, atol=1e-5,
                               err_msg=c["name"])
    experts, kept = routing(x, gate, 2, None)
    rows = minimum_rows(experts, kept, c["splits"], 8, world)
    for r in range(world):
        assert "moe.exchange_plan" in str(ranks[r]["ir"]), c["name"]
        stats = json.loads(str(ranks[r]["stats"]))
        assert stats["exchanges"][0]["sent_bytes"] == rows[r] * 32 * 4, (c["name"], r)


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_matches_one_process(tmp_path: Path, world: int) -> None:
    """Uneven token counts, a rank without tokens, capacity on and off, a skewed router, top-4, the reference and
    cpu targets, weights in full and as this rank's block, and bitwise equality under SPARSA_DETERMINISTIC=1."""
    todo = prepare(tmp_path, world)
    run_ranks(world, tmp_path)
    check(tmp_path, world, todo)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 4), st.sampled_from([1, 2, 4]), st.integers(1, 3), st.data())
def test_global_capacity_brute_force(ranks: int, per_rank: int, k: int, data: st.DataObject) -> None:
    """Each rank's kept assignments, from the ranks' counts alone, are exactly what one process keeps."""
    E = ranks * per_rank
    k = min(k, E)
    sizes = data.draw(st.lists(st.integers(0, 6), min_size=ranks, max_size=ranks))
    capacity = data.draw(st.sampled_from([None, 0.25, 0.5, 1.0, 1.5]))
    experts = np.array(data.draw(st.lists(st.lists(st.integers(0, E - 1), min_size=k, max_size=k, unique=True),
                                          min_size=sum(sizes), max_size=sum(sizes))), dtype=np.int64).reshape(-1, k)
    want = kept_assignments(experts, E, capacity)
    splits = np.concatenate([[0], np.cumsum(sizes)])
    counts = np.array([[sizes[r], *np.bincount(experts[splits[r]:splits[r + 1]].reshape(-1), minlength=E)]
                       for r in range(ranks)])
    for r in range(ranks):
        mine = experts[splits[r]:splits[r + 1]]
        got = global_keep(mine, E, capacity, counts, r)
        assert np.array_equal(got, want[splits[r]:splits[r + 1]])
        rows, local, sends = plan(mine, got, E, ranks)
        assert sends.sum() == rows.size == local.shape[0]
        assert sends.tolist() == [len({t for t in range(mine.shape[0]) for j in range(k)
                                       if got[t, j] and mine[t, j] // per_rank == d}) for d in range(ranks)]
        back = np.repeat(np.arange(ranks), sends)
        for i, t in enumerate(rows):  # every kept slot on its rank, once, as a local id; every other slot -1
            for j in range(k):
                on = got[t, j] and mine[t, j] // per_rank == back[i]
                assert local[i, j] == (mine[t, j] - back[i] * per_rank if on else -1)


def test_needs_a_process_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already set up in this process")
    with pytest.raises(SparsaError, match="init_process_group"):
        sparsa.compile(moe_source(), target="reference", expert_parallel=object())


def test_pipeline_and_ir_text() -> None:
    """shard-experts goes right after fuse-moe-dispatch, and its ops print and parse back."""
    from sparsa.ir import parse_module, print_module
    from sparsa.passes import PassManager
    from sparsa.passes.pipelines import expert_parallel_pipeline, sparse_pipeline

    pipe = expert_parallel_pipeline(sparse_pipeline(block=64), 2)
    assert "fuse-moe-dispatch{block=64},shard-experts{ranks=2}," in pipe
    module = sparsa.frontend.compile_source(moe_source(2, 0.5), "<t>")[0]
    out = PassManager(pipe).run(module)
    text = print_module(out)
    for name in ("moe.exchange_plan", "moe.all_to_all", "moe.combine_rows", "drop_negative = true", "shards = 2",
                 "capacity = 0.5"):
        assert name in text
    assert print_module(parse_module(text)) == text
    with pytest.raises(SparsaError, match="do not split into equal blocks over 3 ranks"):
        PassManager(expert_parallel_pipeline(sparse_pipeline(block=64), 3)).run(
            sparsa.frontend.compile_source(moe_source(), "<t>")[0])


def test_compiled_for_ranks_without_a_group_can_be_read_not_run() -> None:
    """`expert_parallel=2` (a number, no group) compiles the sharded code to be read; running it is refused."""
    m = sparsa.compile(moe_source(), target="cpu", expert_parallel=2)
    assert "moe.exchange_plan" in m.ir() and "shards = 2" in m.ir() and m.shards == {"w1": 2, "w3": 2, "w2": 2}
    assert "@" in m.stage("llvm")
    with pytest.raises(SparsaError, match="without a process group"):
        m.init_weights(0)
    with pytest.raises(SparsaError, match="no moe whose experts"):
        sparsa.compile("model M(x: f32[T, 4]) -> f32[T, 4] { return x * 2.0 }", target="reference", expert_parallel=2)
    if importlib.util.find_spec("triton") is not None:  # the triton launcher runs the exchange on the host
        assert "host_op(" in sparsa.compile(moe_source(), target="triton", expert_parallel=2).stage("launcher")


@pytest.mark.slow
def test_readme_torchrun_command(tmp_path: Path) -> None:
    """The README's command: two processes under torchrun, each printing its output and the bytes it moved."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert "torchrun --nproc-per-node 2 --no-python sparsa run examples/mixtral_moe.sp" in readme
    root = Path(__file__).parent.parent
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
           str(_free_port()), "--no-python", "sparsa", "run", str(root / "examples" / "mixtral_moe.sp"),
           "--random-weights", "--input", "x=randn:1024,512", "--target", "cpu", "--expert-parallel",
           "--out", str(tmp_path / "y.npz")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    for r in range(2):
        assert f"[rank {r}/2] all_to_all: sent" in done.stdout
        assert np.load(tmp_path / f"y.rank{r}.npz")["output0"].shape == (1024, 512)
