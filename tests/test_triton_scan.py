"""The generated fused-scan Triton kernel against the reference (Mamba's selective scan and variants)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("triton")
torch = pytest.importorskip("torch")

import sparsa  # noqa: E402
from sparsa.backends.reference.interpreter import Interpreter  # noqa: E402
from sparsa.backends.triton.scan import FusedScanKernel  # noqa: E402
from sparsa.ir.dialects.scan import FusedScanOp  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EXAMPLES = Path(__file__).parent.parent / "examples"


@pytest.mark.parametrize("shape", [(2, 7, 5, 3), (1, 20, 33, 16)])
def test_selective_scan_kernel(shape, monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSA_CACHE_DIR", str(tmp_path))
    B, L, DI, N = shape
    model = sparsa.compile(str(EXAMPLES / "selective_scan.sp"), target="reference")
    func = model.module.funcs[-1]
    rng = np.random.default_rng(0)
    ins = [rng.standard_normal((B, L, DI)).astype(np.float32), np.abs(rng.standard_normal((B, L, DI))).astype(
        np.float32) * 0.1, -np.abs(rng.standard_normal((DI, N))).astype(np.float32),
        rng.standard_normal((B, L, N)).astype(np.float32), rng.standard_normal((B, L, N)).astype(np.float32),
        rng.standard_normal(DI).astype(np.float32)]
    interp = Interpreter(func, {})
    interp.run(ins)
    op = next(o for o in func.walk() if isinstance(o, FusedScanOp))
    kernel = FusedScanKernel.generate(op)
    assert "# scan.fused from" in kernel.source and "h = a_t * h + b_t" in kernel.source
    assert "# tensor.add @" in kernel.source  # the skip term + D * u after the sum (fuse-scan-epilogue)
    inputs = [torch.from_numpy(np.ascontiguousarray(interp.lookup(v))).to(DEVICE) for v in op.inputs]
    out = kernel(inputs, (B, L, DI, N))
    expected = interp.lookup(op.result)
    np.testing.assert_allclose(out.cpu().numpy(), expected, rtol=1e-4, atol=1e-4)


def test_consumer_over_another_axis_is_a_clear_error_only_when_it_sums_several():
    """A sum over one state axis (any but time) is the kernel's reduced axis; a sum over two is refused by name."""
    src = """model M(a: f32[B, L, D], b: f32[B, L, D]) -> f32[B, L] {
    h = scan(a[:, :, :, None] * ones([4]), b[:, :, :, None] * ones([4]), axis=1)
    return sum(h * 2.0, axis=[2, 3])
}"""
    model = sparsa.compile(src, target="reference")
    op = next((o for o in model.module.walk() if isinstance(o, FusedScanOp)), None)
    if op is None:
        pytest.skip("not fused")
    with pytest.raises(sparsa.ir.SparsaError, match="over one state axis"):
        FusedScanKernel.generate(op)


@pytest.mark.slow
def test_scan_kernel_compiles_to_ptx(tmp_path):
    from test_triton_attention import compile_for_nvidia

    op = next(o for o in sparsa.compile(str(EXAMPLES / "selective_scan.sp"), target="reference").module.walk()
              if isinstance(o, FusedScanOp))
    kernel = FusedScanKernel.generate(op)
    types = {f"X{i}": "*fp32" for i in range(kernel.n_inputs)} | {"OUT": "*fp32"}
    assert compile_for_nvidia(tmp_path, kernel.name, kernel.source, types, {"BLOCK_O": 32, "BLOCK_N": 16}) == [
        "80", "90"]


@pytest.mark.slow
def test_scan_grad_kernel_compiles_to_ptx(tmp_path):
    """The reverse kernel (scan.fused_grad: checkpoints, a chunk's states again, atomics into the gradients) builds
    for sm_80 and sm_90 (the interpreter runs it in test_scan_grad)."""
    from test_triton_attention import compile_for_nvidia

    from sparsa.backends.triton.scan_grad import generate
    from sparsa.ir.dialects.scan_grad import CHUNK, FusedScanGradOp

    m = sparsa.compile(str(EXAMPLES / "selective_scan.sp"), target="reference")
    from sparsa.ir import parse_module

    op = next(o for o in parse_module(m.ir(grad=True)).walk() if isinstance(o, FusedScanGradOp))
    name, source = generate(op)
    types = {f"{p}{i}": "*fp32" for p in "XG" for i in range(len(op.xs))} | {n: "*fp32" for n in ("DY", "CK", "HS",
                                                                                                   "AS")}
    assert compile_for_nvidia(tmp_path, name, source, types, {"BLOCK_O": 32, "BLOCK_N": 16, "CHUNK": CHUNK}) == [
        "80", "90"]
