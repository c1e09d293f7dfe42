"""`scan.fused_grad`, a fused scan's backward with its states computed again chunk by chunk: its reference against
its expansion (the unfused scan's rules) and autograd, the cpu lane kernel against the reference across item,
chunk and thread boundaries on both hosts, and the forms the lanes do not take expanded."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import sparsa
from sparsa.ir import parse_module, print_module

ROOT = Path(__file__).parent.parent
SCAN = (ROOT / "examples" / "selective_scan.sp").read_text()


def _inputs(B, L, D, N, seed=0):
    rng = np.random.default_rng(seed)
    xs = [rng.standard_normal(s).astype(np.float32) for s in [(B, L, D), (B, L, D), (D, N), (B, L, N), (B, L, N),
                                                                (D,)]]
    xs[1], xs[2] = np.abs(xs[1]) * 0.3 + 0.05, -np.abs(xs[2]) - 0.5  # a step size > 0, a decay < 0 (Mamba's)
    return xs


def _grads(m, xs, seed=1):
    y, pullback = m.vjp(*xs)
    dy = np.random.default_rng(seed).standard_normal(np.shape(y)).astype(np.float32)
    return np.asarray(y), {k: np.asarray(v) for k, v in pullback(dy).items()}, dy


def _close(got, want, tol=2e-5):
    for n, w in want.items():
        scale = max(1.0, float(np.abs(w).max()))
        np.testing.assert_allclose(got[n], w, rtol=tol, atol=tol * scale, err_msg=f"d{n}")


def test_backward_holds_no_states_and_round_trips():
    """The saved forward returns no state-sized residual ([B, L, DI, N]); the backward is one scan.fused_grad whose
    derivative regions yield the state's step; the module prints and parses back to the same text."""
    m = sparsa.compile(SCAN, target="reference")
    text = m.ir(grad=True)
    module = parse_module(text)
    assert print_module(module) == text
    fwd, bwd = module.funcs[1], module.funcs[2]
    assert not any(t.rank == 4 and t.shape[1:] == ("L", "DI", "N") for t in fwd.attributes["result_types"])
    assert [op.NAME for op in bwd.regions[0].block.ops].count("scan.fused_grad") == 1
    assert "scan.scan" not in text
    # the forward's skip term joined its scan after differentiate (fuse-scan-epilogue): no [B, L, DI] pass of its own
    assert [op.NAME for op in fwd.regions[0].block.ops if op.NAME != "tensor.expand_dims"] == ["scan.fused",
                                                                                               "func.return"]


def test_an_epilogue_is_joined_after_the_derivative():
    """A pipeline that differentiates a scan whose consumer has an epilogue is told to differentiate first."""
    with pytest.raises(sparsa.ir.SparsaError, match="differentiate before fuse-scan-epilogue"):
        sparsa.compile(SCAN, target="reference", passes="canonicalize,fuse-scan,fuse-scan-epilogue,differentiate")


@pytest.mark.parametrize(("B", "L", "D", "N"), [(1, 1, 1, 1), (2, 9, 5, 4), (1, 40, 3, 2)])
def test_reference_against_expansion_and_autograd(B, L, D, N):
    """The op's reference (a step loop over its derivative regions) equals its expansion run by the reference, and
    autograd through the forward written out step by step."""
    xs = _inputs(B, L, D, N)
    y, want, dy = _grads(sparsa.compile(SCAN, target="reference"), xs)
    expanded = sparsa.compile(SCAN, target="reference")
    expanded._pm = type(expanded._pm)(expanded._pm.pipeline + ",expand-scan-grads", expanded._pm.options)
    _, got, _ = _grads(expanded, xs)
    assert "scan.fused_grad" not in print_module(expanded._backward().module)
    _close(got, want, 1e-5)
    ts = [torch.tensor(x, dtype=torch.float64, requires_grad=True) for x in xs]
    u, delta, A, Bs, C, Dskip = ts
    dA, dBu = torch.exp(delta[..., None] * A), (delta * u)[..., None] * Bs[:, :, None, :]
    h, hs = torch.zeros(B, D, N, dtype=torch.float64), []
    for t in range(L):
        h = dA[:, t] * h + dBu[:, t]
        hs.append(h)
    out = (torch.stack(hs, 1) * C[:, :, None, :]).sum(-1) + Dskip * u
    out.backward(torch.tensor(dy, dtype=torch.float64))
    _close(want, {n: t.grad.numpy() for n, t in zip(["u", "delta", "A", "Bs", "C", "Dskip"], ts, strict=True)},
           1e-4)


@pytest.mark.parametrize("host", ["native", "python"])
@pytest.mark.parametrize(("B", "L", "D", "N", "threads"), [(1, 1, 1, 1, "1"), (2, 33, 70, 16, "3"),
                                                           (3, 64, 16, 5, "2"), (1, 100, 130, 3, "1")])
def test_lane_kernel_against_reference(monkeypatch, host, B, L, D, N, threads):
    """Channel counts below, at and past an item (masked tails), lengths across chunk ends (a chunk is 32 steps),
    a batch that items share A's cotangent over, 1-3 threads, the native and the Python host."""
    pytest.importorskip("torch_mlir")
    monkeypatch.setenv("SPARSA_NUM_THREADS", threads)
    monkeypatch.setenv("SPARSA_NATIVE_HOST", "1" if host == "native" else "0")
    xs = _inputs(B, L, D, N, seed=L)
    _, want, _ = _grads(sparsa.compile(SCAN, target="reference"), xs)
    cpu = sparsa.compile(SCAN, target="cpu")
    for _ in range(2):  # the second call from the compiled host plan
        _, got, _ = _grads(cpu, xs)
        _close(got, want)
    assert "scan.fused_grad" in print_module(cpu._backward().module)
    assert "vector.maskedload" in cpu._grad.native.stages["mlir"]


@pytest.mark.parametrize(("machine", "few", "lanes"), [("x86-64", 32, 32), ("x86-64-v3", 64, 64),
                                                      ("x86-64-v4", 64, 128)])
def test_lane_scan_items_by_the_targets_vectors(machine, few, lanes):
    """An item takes 8 vectors of channels (`scan_vectors`: 8 of 4 lanes on SSE, 8 of 8 on AVX2, 8 of 16 on
    AVX-512) where the channels make 4 items of them or are known only at run time, else 64 lanes at most 8
    vectors (`scan_item_vectors`: 4 of 16 on AVX-512). Forward and backward against the reference (channels
    known at run time), with a masked tail item (70 channels), on each ISA this host runs."""
    pytest.importorskip("torch_mlir")
    from sparsa.backends.cpu.target import named_target

    target = named_target(machine)
    assert target.lanes() * target.scan_item_vectors == few
    assert [target.lanes() * target.scan_vectors(c) for c in (70, 3 * lanes, 3 * lanes + 1, None)] == \
        [few, few, lanes, lanes]
    if not target.runs_here():
        pytest.skip(f"this host cannot run {machine} code")
    xs = _inputs(2, 19, 70, 16, seed=5)
    y_want, want, _ = _grads(sparsa.compile(SCAN, target="reference"), xs)
    cpu = sparsa.compile(SCAN, target=f"cpu:{machine}")
    y, got, _ = _grads(cpu, xs)
    np.testing.assert_allclose(y, y_want, rtol=2e-5, atol=2e-5)
    _close(got, want)
    for stages in (cpu.native.stages, cpu._grad.native.stages):
        assert f"vector<{lanes}xf32>" in stages["mlir"]


OTHER = """model M(a: f32[B, L, D], u: f32[B, L, D], c: f32[B, L, N], w: f32[D, N]) -> f32[B, L, D] {
    h = scan(DECAY, (u * a)[:, :, :, None] * c[:, :, None, :], axis=1)
    return sum(h * c[:, :, None, :], axis=-1)
}"""


@pytest.mark.parametrize(("decay", "lanes"), [("sigmoid(a[:, :, :, None] - w) * 0.5", True),
                                              ("exp(-(a * a)[:, :, :, None] * w) / 2.0", True),
                                              ("exp(-max(a[:, :, :, None] - w, 0.0))", False)])
def test_other_scans_on_cpu(decay, lanes):
    """A producer of sigmoid and a constant, one of a division (its rule: constants in the lanes), and one whose
    rule compares and selects (max: the lanes do not run it, so the cpu backend expands the op): each against
    the reference, and an input read in two regions (c) gets both cotangents."""
    pytest.importorskip("torch_mlir")
    src = OTHER.replace("DECAY", decay)
    rng = np.random.default_rng(3)
    xs = [rng.standard_normal(s).astype(np.float32) for s in [(2, 37, 20), (2, 37, 20), (2, 37, 3), (20, 3)]]
    xs[3] = np.abs(xs[3])
    _, want, _ = _grads(sparsa.compile(src, target="reference"), xs)
    cpu = sparsa.compile(src, target="cpu")
    _, got, _ = _grads(cpu, xs)
    _close(got, want)
    assert ("vector.maskedload" in cpu._grad.native.stages["mlir"]) == lanes


@pytest.mark.parametrize("decay", [None, "exp(-max(a[:, :, :, None] - w, 0.0))"])
def test_triton_kernel_against_reference(decay):
    """The generated reverse kernel (Triton's interpreter without a GPU): 70 steps (three chunks, the last short),
    80 outer positions (three programs), a reduced axis of 5 in 8 lanes; the selective scan, and a decay whose rule
    compares and selects."""
    pytest.importorskip("triton")
    if decay is None:
        src, xs = SCAN, _inputs(2, 70, 40, 5)
    else:
        src = OTHER.replace("DECAY", decay)
        rng = np.random.default_rng(4)
        xs = [rng.standard_normal(s).astype(np.float32) for s in [(2, 70, 40), (2, 70, 40), (2, 70, 5), (40, 5)]]
    _, want, _ = _grads(sparsa.compile(src, target="reference"), xs)
    tri = sparsa.compile(src, target="triton")
    _, got, _ = _grads(tri, xs)
    _close(got, want)
    assert "fused_scan_grad_" in tri._grad.native.stages["source"]


def test_scan_regions_are_isolated():
    """A fused scan's regions see only their own values: cse keeps a region's constant though the function has the
    same one outside (it merged them, and the kernels could not read it), and the verifier refuses a region op
    reading an outer value."""
    from sparsa.ir import VerifyError, verify_module
    from sparsa.ir.dialects.scan import FusedScanOp

    src = OTHER.replace("DECAY", "exp(-max(a[:, :, :, None] - w, 0.0))")
    module = parse_module(sparsa.compile(src, target="reference").ir(grad=True))
    verify_module(module)
    fused = next(o for o in module.walk() if isinstance(o, FusedScanOp))
    outer = fused.inputs[0]
    inner = fused.producer.block.ops[0]
    inner.set_operand(0, outer)
    with pytest.raises(VerifyError, match="does not dominate"):
        verify_module(module)
