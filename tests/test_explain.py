"""`sparsa explain` and `m.stats()`: FLOPs done vs dense, block maps, routing and kernels, as users see them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import sparsa

EXAMPLES = Path(__file__).parent.parent / "examples"


def explain(*args):
    return subprocess.run([sys.executable, "-m", "sparsa.runtime.cli", "explain", *args], capture_output=True,
                          text=True, timeout=300)


def test_explain_sliding_window_shows_the_block_map(tmp_path):
    png = tmp_path / "map.png"
    r = explain(str(EXAMPLES / "sliding_window_attention.sp"), "--shape", "B=1", "--shape", "S=512",
                "--block-map", str(png))
    assert r.returncode == 0, r.stderr
    out = r.stdout
    # 8 query blocks of 64 with a 256 window: diagonal PARTIAL, three FULL below it, one PARTIAL after.
    assert "block-sparse 64x64: 18 full, 12 partial, 34 empty tiles" in out
    assert "+.......\n#+......\n##+.....\n###+....\n+###+...\n.+###+..\n..+###+.\n...+###+" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_explain_moe_reports_tokens_per_expert():
    r = explain(str(EXAMPLES / "switch_capacity.sp"), "--shape", "T=64")
    assert r.returncode == 0, r.stderr
    line = next(ln for ln in r.stdout.splitlines() if "tokens per expert" in ln)
    counts = [int(c) for c in line.split("[")[1].split("]")[0].split(",")]
    assert len(counts) == 16 and max(counts) <= 5 and sum(counts) <= 64  # capacity ceil(1.25 * 64 / 16) = 5
    assert "gates * rows scattered into the output" in r.stdout


def test_explain_needs_sizes_and_says_which():
    r = explain(str(EXAMPLES / "mixtral_moe.sp"))
    assert r.returncode == 1 and "input 'x' has symbolic size T: give it with --shape T=N" in r.stderr


def test_stats_after_a_call():
    m = sparsa.compile(str(EXAMPLES / "sparse_ffn.sp"), target="reference").init_weights(0)
    m(np.zeros((4, 1024), np.float32))
    stats = m.stats()
    call = stats["last_call"]
    assert 0 < call["flops"] < call["dense_flops"]
    kernels = {k["op"]: k["kernel"] for k in call["kernels"]}
    assert kernels["sparse.bsr_matmul"].startswith("block-sparse:") and kernels["sparse.nm_matmul"] == "2:4 sparse"
    assert stats["prepared_weight_bytes"] > 0 and stats["weight_bytes"] == (1024 * 4096 * 2) * 4


@pytest.mark.parametrize("density,kernel", [(0.3, "block-sparse"), (0.9, "dense kernel")])
def test_bsr_kernel_choice_follows_density(density, kernel):
    src = "model M(x: f32[T, 64]) -> f32[T, 64] {\n  param w: f32[64, 64] sparse bsr(8, 8)\n  return x @ w\n}\n"
    rng = np.random.default_rng(0)
    blocks = rng.random((8, 8)) < density
    w = np.kron(blocks, np.ones((8, 8))).astype(np.float32) * rng.standard_normal((64, 64)).astype(np.float32)
    m = sparsa.compile(src, target="reference").load_weights({"w": w})
    x = rng.standard_normal((3, 64)).astype(np.float32)
    np.testing.assert_allclose(m(x), x @ w, rtol=1e-5, atol=1e-5)
    assert m.stats()["last_call"]["kernels"][0]["kernel"].startswith(kernel)
