"""The cpu backend's first slice: IR lowered through upstream MLIR (linalg) to LLVM, JIT-compiled, and
compared with the reference interpreter on fixed and random programs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch_mlir")


import sparsa  # noqa: E402
from sparsa.backends.cpu.context import CpuLoweringError  # noqa: E402
from sparsa.backends.cpu.jit import CpuFunction  # noqa: E402

ROOT = Path(__file__).parent.parent
rng = np.random.default_rng(0)


def randn(*shape):
    return rng.standard_normal(shape).astype(np.float32)


def test_dense_program_with_symbolic_rows():
    src = """model M(x: f32[T, 8], w: f32[8, 4], b: f32[4]) -> f32[T, 4] {
    h = silu(x @ w + b) * 2.0 - 1.0
    return softmax(where(h > 0.0, h, h * 0.1), axis=-1) + mean(x, axis=-1, keepdim=true) + max(transpose(h, [1, 0]), axis=0)[:, None]
}"""
    m = sparsa.compile(src, passes="canonicalize,cse,dce", target="reference")
    cpu = CpuFunction(m.module.funcs[-1])
    assert "linalg.generic" in cpu.stages["mlir"] and "llvm.func" in cpu.stages["llvm"]
    for T in (1, 3, 17):  # one compile serves every length
        x, w, b = randn(T, 8), randn(8, 4), randn(4)
        np.testing.assert_allclose(cpu([x, w, b], None, {})[0], m(x, w, b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("a,b", [((2, 3, 4, 5), (5, 6)), ((3, 1, 4, 5), (2, 5, 6)), ((7, 5), (5, 3))])
def test_broadcasting_matmul(a, b):
    src = f"model M(a: f32[{', '.join(map(str, a))}], b: f32[{', '.join(map(str, b))}]) -> " \
          f"f32[{', '.join(map(str, np.broadcast_shapes(a[:-2], b[:-2]) + (a[-2], b[-1])))}] {{\n  return a @ b\n}}\n"
    m = sparsa.compile(src, target="reference")
    x, y = randn(*a), randn(*b)
    np.testing.assert_allclose(CpuFunction(m.module.funcs[-1])([x, y], None, {})[0], x @ y, rtol=1e-5, atol=1e-5)


FFN = """const D = 16
model FFN(x: f32[T, D]) -> f32[T, D] {
    param w1: f32[D, 32]
    param w2: f32[32, D]
    param g: f32[D]
    h = x / sqrt(mean(x * x, axis=-1, keepdim=true) + 1e-6) * g
    return x + silu(h @ w1) @ w2
}
"""


def test_matmul_is_tiled_and_vectorized_by_the_schedule():
    """Full TILE_M x TILE_N tiles become vector outer products with the accumulators in registers; the rows
    and columns past the last full tile (peeled loops) stay scalar, and the result is the same."""
    from sparsa.backends.cpu.target import host_target

    TILE_M, TILE_N = host_target().tile
    m = sparsa.compile("model M(x: f32[T, 24], w: f32[24, 70]) -> f32[T, 70] {\n    return x @ w\n}",
                       passes="canonicalize", target="reference")
    cpu = CpuFunction(m.module.funcs[-1])
    assert "transform.structured.tile_using_for" in cpu.stages["schedule"]
    assert "transform.loop.peel" in cpu.stages["schedule"]  # T symbolic, 70 not a multiple of TILE_N
    assert f"vector<{TILE_N}xf32>" in cpu.stages["loops"] and "vector.fma" in cpu.stages["loops"]
    for T in (1, TILE_M, 3 * TILE_M + 5):
        x, w = randn(T, 24), randn(24, 70)
        np.testing.assert_allclose(cpu([x, w], None, {})[0], x @ w, rtol=1e-5, atol=1e-5)


def test_cpu_target_runs_a_dense_model_with_weights():
    cpu = sparsa.compile(FFN, target="cpu").init_weights(3)
    ref = sparsa.compile(FFN, target="reference").init_weights(3)
    for T in (1, 6):
        x = randn(T, 16)
        np.testing.assert_allclose(cpu(x), ref(x), rtol=1e-5, atol=1e-5)
    assert "linalg.generic" in cpu.stage("mlir") and "llvm.func" in cpu.stage("llvm")


def test_cpu_target_refuses_unsupported_ops_by_name(tmp_path):
    import subprocess
    import sys

    with pytest.raises(CpuLoweringError, match=r"mixtral_moe.sp:\d+:\d+: error: 'moe.moe' is not supported by the cpu "
                                               r"backend \(run the fuse-moe-gating and fuse-moe-dispatch passes"):
        sparsa.compile(str(ROOT / "examples" / "mixtral_moe.sp"), target="cpu", passes="canonicalize")
    src = tmp_path / "ffn.sp"
    src.write_text(FFN)
    r = subprocess.run([sys.executable, "-m", "sparsa.runtime.cli", "compile", str(src), "--target", "cpu", "--emit",
                        "mlir"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "linalg.generic" in r.stdout and "func.func @k0_" in r.stdout, r.stderr
    r = subprocess.run([sys.executable, "-m", "sparsa.runtime.cli", "compile", str(src), "--emit", "mlir"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "func.func @k0_" in r.stdout, r.stderr  # target auto: cpu here
    r = subprocess.run([sys.executable, "-m", "sparsa.runtime.cli", "compile", str(src), "--target", "reference",
                        "--emit", "mlir"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "target 'reference' has no stage 'mlir'" in r.stderr


SHARED_IN_EXPERTS = """model M(x: f32[T, 32]) -> f32[T, 32] {
    param gate: f32[32, 4]
    param w1: f32[4, 32, 16]
    param w2: f32[4, 16, 32]
    param a: f32[]
    param b: f32[16]
    w, idx = topk(softmax(x @ gate), k=2)
    return moe(x, idx, w) |e, h| { tanh((h @ w1[e]) * a + b) @ w2[e] }
}"""


def test_experts_reading_shared_params_run_on_cpu():
    """An expert body reading parameters no expert indexes (a 0-d scale, a shared bias), which had failed in the
    grouped GEMM kernel with a KeyError. A 0-d one is an argument of the kernel, read in its fused epilogue (the
    combine's too); the cpu pipeline's fuse-moe-dispatch leaves an epilogue reading a shared [N] tensor as tensor ops
    after the grouped matmul, and a pipeline fusing it is refused at the body's line."""
    scaled = SHARED_IN_EXPERTS.replace("tanh((h @ w1[e]) * a + b) @ w2[e]", "(tanh((h @ w1[e]) * a) @ w2[e]) * a")
    for src, fused in ((SHARED_IN_EXPERTS, False), (scaled, True)):
        cpu = sparsa.compile(src, target="cpu").init_weights(2)
        ref = sparsa.compile(src, target="reference").init_weights(2)
        for T in (5, 37):
            x = randn(T, 32)
            np.testing.assert_allclose(cpu(x), ref(x), rtol=1e-5, atol=1e-5)
        ops = [op.NAME for op in cpu.module.funcs[-1].regions[0].block.ops]
        assert "moe.moe" not in ops and {"moe.grouped_matmul", "moe.grouped_matmul_combine"} <= set(ops)
        assert ("tensor.tanh" not in ops) == fused, ops  # in the grouped matmul's epilogue, or a tensor op after it
    with pytest.raises(CpuLoweringError, match=r"<source>:8:\d+: error: 'moe.grouped_matmul' whose epilogue reads tensors "
                                               r"from outside the expert body is not supported by the cpu backend"):
        sparsa.compile(SHARED_IN_EXPERTS, target="cpu", passes="canonicalize,fuse-moe-gating,fuse-moe-dispatch,cse,dce")


@pytest.mark.parametrize("dtype", ["f16", "bf16"])
def test_half_precision_is_refused_not_miscomputed(dtype):
    src = f"model M(x: {dtype}[T, 16], w: {dtype}[16, 8]) -> {dtype}[T, 8] {{\n    return silu(x @ w)\n}}\n"
    with pytest.raises(CpuLoweringError, match=rf"<source>:2:\d+: error: 'tensor.matmul' is not supported by the cpu backend \(its "
                                               rf"kernels are float32 and integer, not {dtype}"):
        sparsa.compile(src, target="cpu")
