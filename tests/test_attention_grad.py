"""Attention's reverse mode: the shared attention examples' pullbacks against autograd transcriptions on every
target; float64 central differences through a mask with empty rows, a soft cap and a relative bias, with
grouped heads; the backward reusing the forward's block map (EMPTY tiles never visited, per-call maps of data
masks saved, not rebuilt); block sizes and masks drawn at random on cpu against the reference."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import sparsa
from sparsa.backends import base as backends
from sparsa.ir.diagnostics import SparsaError

torch = pytest.importorskip("torch")
EXAMPLES = Path(__file__).parent.parent / "examples"
TARGETS = ["reference", "cpu", "triton"]


def _needs(target: str) -> None:
    if target == "cpu":
        pytest.importorskip("torch_mlir")
    if target == "triton":
        pytest.importorskip("triton")


def attention(q, k, v, allowed, scale, score=None):
    """softmax(score(scale q k^T) where allowed) v, grouped heads repeated, rows allowing nothing 0."""
    rep = q.shape[1] // k.shape[1]
    s = scale * q @ k.repeat_interleave(rep, 1).transpose(-1, -2)
    s = score(s) if score is not None else s
    s = s.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(s, -1)
    p = torch.where(allowed.any(-1, keepdim=True), p, torch.zeros_like(p))
    return p @ v.repeat_interleave(rep, 1)


def _sliding(x, wq, wk, wv, wo):
    B, S, _ = x.shape
    q = (x @ wq).reshape(B, S, 8, 64).transpose(1, 2)
    k = (x @ wk).reshape(B, S, 2, 64).transpose(1, 2)
    v = (x @ wv).reshape(B, S, 2, 64).transpose(1, 2)
    i = torch.arange(S)
    o = attention(q, k, v, (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < 256), 0.125)
    return o.transpose(1, 2).reshape(B, S, 512) @ wo


def _document(q, k, v, doc):
    i = torch.arange(q.shape[2])
    return attention(q, k, v, (doc[:, None] == doc[None, :]) & (i[None, :] <= i[:, None]), 0.125)


def _longformer(q, k, v):
    i = torch.arange(q.shape[2])
    allowed = ((i[:, None] - i[None, :]).abs() <= 128) | (i[:, None] < 16) | (i[None, :] < 16)
    return attention(q, k, v, allowed, 0.125, lambda s: 20.0 * torch.tanh(s / 20.0))


GQA_SLIDING = """
mask sliding(q, k) = k <= q and q - k < 40
model M(q: f32[1, 4, S, 64], k: f32[1, 2, S, 64], v: f32[1, 2, S, 64]) -> f32[1, 4, S, 64] {
    return attention(q, k, v, mask=sliding)
}
"""


def _gqa_sliding(q, k, v):
    i = torch.arange(q.shape[2])
    return attention(q, k, v, (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < 40), 0.125)


# the sliding-window example's projections (512 wide) take minutes in Triton's interpreter: its attention alone there
CASES = [(t, ex, fn, S) for t in TARGETS for ex, fn, S in [
    ("sliding_window_attention.sp", _sliding, 300), ("document_attention.sp", _document, 200),
    ("longformer_attention.sp", _longformer, 290), (GQA_SLIDING, _gqa_sliding, 150),
] if not (t == "triton" and ex == "sliding_window_attention.sp")]


@pytest.mark.parametrize(("target", "example", "fn", "S"), CASES, ids=[f"{c[0]}-{c[2].__name__}" for c in CASES])
def test_attention_examples_against_autograd(target: str, example: str, fn, S: int) -> None:
    """Every gradient (inputs and weights) against autograd's through the dense masked transcription; the
    sizes cross several 64-blocks with a ragged last one, so EMPTY, FULL and PARTIAL tiles all occur."""
    _needs(target)
    rng = np.random.default_rng(3)
    m = sparsa.compile(str(EXAMPLES / example) if example.endswith(".sp") else example, target=target)
    if example == "sliding_window_attention.sp":
        m.init_weights(1)
        xs = [rng.standard_normal((1, S, 512)).astype(np.float32)]
        ws = {n: np.asarray(m.weights[n]) for n in ("wq", "wk", "wv", "wo")}
    else:
        heads = [(4, 2, 2)] if example == GQA_SLIDING else [(2, 2, 2) if target == "triton" else (3, 3, 3)]
        xs = [rng.standard_normal((1, h, S, 64)).astype(np.float32) for h in heads[0]]
        ws = {}
        if example == "document_attention.sp":
            xs.append(np.sort(rng.integers(0, 4, S)).astype(np.int32))
    y, pullback = m.vjp(*xs)
    dy = rng.standard_normal(np.shape(y)).astype(np.float32)
    grads = pullback(dy)
    ts = {n: torch.tensor(x, requires_grad=x.dtype == np.float32) for n, x in zip(m.input_names, xs, strict=True)}
    ts |= {n: torch.tensor(w, requires_grad=True) for n, w in ws.items()}
    out = fn(*ts.values())
    out.backward(torch.tensor(dy))
    np.testing.assert_allclose(np.asarray(y), out.detach().numpy(), rtol=2e-4, atol=2e-5)
    assert set(grads) == {n for n, t in ts.items() if t.requires_grad}
    for n, t in ts.items():
        if t.requires_grad:
            want = t.grad.numpy()
            np.testing.assert_allclose(np.asarray(grads[n]), want, rtol=2e-3, atol=2e-4 * np.abs(want).max(),
                                       err_msg=f"{example} on {target}: d{n}")


FD_SOURCE = """
mask m(q, k) = k <= q and q >= 3 and q - k < 9
score s(s, b, h, q, k) = 4.0 * tanh(s / 4.0) - 0.05 * (h + 1) * (q - k)
model M(q: f32[2, 4, 13, 8], k: f32[2, 2, 13, 8], v: f32[2, 2, 13, 8]) -> f32[2, 4, 13, 8] {
    return attention(q, k, v, mask=m, score=s, scale=0.4)
}
"""


def test_attention_rule_against_finite_differences() -> None:
    """float64 on the reference (the model's IR with every f32 made f64, through the reference's whole pipeline:
    block map and all): <dy, J e_i> by central differences equals the pullback's component, for q, k and v entries
    of allowed and of fully masked rows (grouped heads, a soft cap and a head-dependent bias)."""
    from sparsa.backends.reference import run_function
    from sparsa.ir import parse_module
    from sparsa.passes import PassManager
    from sparsa.runtime.compiler import grad_pipeline

    text = sparsa.compile(FD_SOURCE, target="reference").ir("input")
    module = parse_module(text.replace("xf32>", "xf64>").replace("tensor<f32>", "tensor<f64>")
                          .replace("to = f32", "to = f64"))
    pipeline = grad_pipeline(backends.get("reference").PIPELINE).replace(
        "differentiate", "differentiate{residuals=recompute}").replace(
        "sparsify-attention", "sparsify-attention{block_q=4,block_k=4}")  # EMPTY, FULL and PARTIAL tiles
    grad = PassManager(pipeline).run(module)
    assert any(op.NAME == "attn.attention_grad" and op.block_map is not None for op in grad.walk())
    fwd, back = (f.attributes["sym_name"] for f in grad.funcs)
    rng = np.random.default_rng(11)
    xs = [rng.standard_normal(s) for s in ((2, 4, 13, 8), (2, 2, 13, 8), (2, 2, 13, 8))]
    (y,) = run_function(grad, xs, func=fwd)
    dy = rng.standard_normal(np.shape(y))
    grads = dict(zip("qkv", run_function(grad, [*xs, dy], func=back), strict=True))
    eps = 1e-6
    for n, x in zip("qkv", xs, strict=True):
        for idx in [tuple(rng.integers(0, d) for d in x.shape) for _ in range(8)] + [(0, 1, 1, 2)]:
            plus, minus = [a.copy() for a in xs], [a.copy() for a in xs]
            plus["qkv".index(n)][idx] += eps
            minus["qkv".index(n)][idx] -= eps
            diff = run_function(grad, plus, func=fwd)[0] - run_function(grad, minus, func=fwd)[0]
            np.testing.assert_allclose(grads[n][idx], np.sum(dy * diff) / (2 * eps), rtol=1e-6, atol=1e-8,
                                       err_msg=f"d{n}{idx}")
    assert (grads["q"][:, :, :3] == 0).all()  # rows 0-2 allow nothing


def test_backward_walks_the_forwards_block_map() -> None:
    """The backward op reads the forward's block map (a compile-time map here: the same EMPTY tiles are skipped),
    the forward also returns its log-sum-exp, and `sparsa explain`'s costs show the skipped work."""
    src = ("mask sliding(q, k) = k <= q and q - k < 128\n"
           "model M(q: f32[1, 2, 512, 64], k: f32[1, 2, 512, 64], v: f32[1, 2, 512, 64]) -> f32[1, 2, 512, 64] {\n"
           "    return attention(q, k, v, mask=sliding)\n}\n")
    m = sparsa.compile(src, target="reference")
    text = m.ir(grad=True)
    assert "attn.attention_lse" in text
    bwd = text[text.index("func.func @M_bwd"):]
    assert "attn.block_map" not in bwd  # the map is a residual, not classified again
    line = next(x for x in bwd.splitlines() if "attn.attention_grad" in x and "=" in x)
    assert "(%q, %k, %v, %r" in line, line  # the inputs, then the forward's block map (and later its lse)


def test_data_mask_reuses_the_per_call_map() -> None:
    """A document mask's block map is built per call in the forward and handed to the backward as a residual."""
    m = sparsa.compile(str(EXAMPLES / "document_attention.sp"), target="reference")
    text = m.ir(grad=True)
    fwd, bwd = text[text.index("@PackedAttention_fwd"):text.index("@PackedAttention_bwd")], \
        text[text.index("@PackedAttention_bwd"):]
    assert fwd.count("attn.block_map") == 1 and "attn.block_map" not in bwd
    assert "tensor<1x1x{(S+63)//64}x{(S+63)//64}xi8>" in bwd.splitlines()[0]


LEARNED = """
score alibi(s, b, h, q, k; slopes: f32[H]) = s + slopes[h] * (k - q)
score rel(s, b, h, q, k; table: f32[H, R], g: f32[]) = s * g + table[h, k - q + S - 1]
model M(q: f32[1, 4, S, 8], k: f32[1, 2, S, 8], v: f32[1, 2, S, 8], gain: f32[]) -> f32[1, 4, S, 8] {
    param slopes: f32[4]
    param table: f32[4, R]
    a = attention(q, k, v, score=alibi(slopes=slopes * 0.5))
    return attention(a, k, v, score=rel(table=table, g=gain), mask=|q, k| k <= q and q - k < 24)
}
"""


def _learned(S: int) -> str:
    """LEARNED at length S (its table 2S - 1 long)."""
    return LEARNED.replace("S - 1", str(S - 1)).replace("R]", f"{2 * S - 1}]").replace("S, 8]", f"{S}, 8]")


def _learned_torch(q, k, v, gain, slopes, table):
    S = q.shape[2]
    i = torch.arange(S)
    rel = i[None, :] - i[:, None]
    a = attention(q, k, v, torch.ones(S, S, dtype=torch.bool), 8 ** -0.5,
                  lambda s: s + (slopes * 0.5)[:, None, None] * rel)
    return attention(a, k, v, (rel <= 0) & (rel > -24), 8 ** -0.5, lambda s: s * gain + table[:, rel + S - 1])


@pytest.mark.parametrize("target", TARGETS)
def test_learned_score_values_get_their_gradients(target: str) -> None:
    """ALiBi slopes (a weight scaled in the model), a relative bias table indexed by k - q and a gain given as an input,
    read by score modifiers: their gradients (scatter-added over the visited tiles' allowed elements) and q, k, v's
    against autograd of a dense transcription, across block edges and grouped heads."""
    _needs(target)
    S = 80 if target != "triton" else 70
    src = _learned(S)
    m = sparsa.compile(src, target=target)
    rng = np.random.default_rng(3)
    weights = {"slopes": rng.uniform(-0.1, 0.1, 4).astype(np.float32),
               "table": rng.standard_normal((4, 2 * S - 1)).astype(np.float32)}
    m.load_weights(weights)
    q, k, v = (rng.standard_normal(s).astype(np.float32) for s in ((1, 4, S, 8), (1, 2, S, 8), (1, 2, S, 8)))
    gain = np.array(0.8, np.float32)
    dy = rng.standard_normal((1, 4, S, 8)).astype(np.float32)
    y, pullback = m.vjp(q, k, v, gain)
    grads = pullback(dy)
    np.testing.assert_allclose(m(q, k, v, gain), y, atol=1e-6)  # the model's own forward reads the weights too
    ts = {n: torch.tensor(a, dtype=torch.float64, requires_grad=True)
          for n, a in dict(q=q, k=k, v=v, gain=gain, **weights).items()}
    out = _learned_torch(ts["q"], ts["k"], ts["v"], ts["gain"], ts["slopes"], ts["table"])
    (out * torch.tensor(dy, dtype=torch.float64)).sum().backward()
    np.testing.assert_allclose(y, out.detach().numpy(), atol=2e-5)
    assert set(grads) == set(ts)
    for name, t in ts.items():
        np.testing.assert_allclose(grads[name], t.grad.numpy(), rtol=2e-4, atol=2e-4, err_msg=name)


def test_learned_value_gradients_on_the_python_host_as_on_the_native_one(monkeypatch) -> None:
    """The cpu target's Python host (its LAUNCHES rule: partials made, passed and summed in NumPy) gives the learned
    values the native host's gradients."""
    pytest.importorskip("torch_mlir")
    src = _learned(70)
    rng = np.random.default_rng(8)
    weights = {"slopes": rng.uniform(-0.1, 0.1, 4).astype(np.float32),
               "table": rng.standard_normal((4, 139)).astype(np.float32)}
    ins = [rng.standard_normal(s).astype(np.float32) for s in ((1, 4, 70, 8), (1, 2, 70, 8), (1, 2, 70, 8))]
    ins.append(np.array(0.9, np.float32))
    dy = rng.standard_normal((1, 4, 70, 8)).astype(np.float32)
    got = []
    for native in ("1", "0"):
        monkeypatch.setenv("SPARSA_NATIVE_HOST", native)
        m = sparsa.compile(src, target="cpu")
        m.load_weights(weights)
        got.append(m.vjp(*ins)[1](dy))
        assert m._grad.native.calls["native" if native == "1" else "python"] == 1
    for name in ("slopes", "table", "gain", "q"):
        np.testing.assert_allclose(got[1][name], got[0][name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_a_learned_value_read_whole_is_refused_at_its_line() -> None:
    """A score region reading a learned vector other than one element at a time (here summed: IR written by hand, the
    language has no such score) is an error at the attention's line, not a wrong gradient."""
    from sparsa.ir import parse_module
    from sparsa.passes import PassManager

    m = sparsa.compile(_learned(16),
                       target="reference")
    text = m.ir("input")
    gather = re.search(r"(%\d+) = tensor.gather\((%\d+), %h\) : \(tensor<4xf32>, tensor<i64>\) -> tensor<f32>", text)
    summed = text.replace(gather.group(0), f"{gather.group(1)} = tensor.sum({gather.group(2)}) {{axes = [0]}} : "
                          "(tensor<4xf32>) -> tensor<f32>")
    with pytest.raises(SparsaError, match="reads the learned value tensor<4xf32> other than as one element") as e:
        PassManager("differentiate").run(parse_module(summed))
    assert "<source>:7:" in str(e.value)


def test_value_grad_region_prints_parses_and_is_verified() -> None:
    """The backward's value_grad region and value_reads print and parse back; value_reads naming an outer value the
    score region does not have is a verifier error."""
    from sparsa.ir import parse_module
    from sparsa.ir.diagnostics import VerifyError
    from sparsa.ir.verifier import verify_module

    m = sparsa.compile(_learned(16),
                       target="reference")
    text = m.ir(grad=True)
    # the masked attention reads its gain and its table (two reads), the other its slopes (one)
    assert sorted(re.findall(r"value_reads = \[[0-9, ]*\]", text)) == ["value_reads = [0, 1]", "value_reads = [0]"]
    assert str(parse_module(text)) == text
    bad = parse_module(text.replace("value_reads = [0]", "value_reads = [7]", 1))
    with pytest.raises(VerifyError, match="value_reads"):
        verify_module(bad)


@settings(max_examples=6, deadline=None)
@given(window=st.integers(1, 70), block=st.sampled_from([16, 32, 64]), causal=st.booleans(),
       sq=st.integers(1, 90), heads=st.sampled_from([(2, 1), (2, 2), (4, 2)]), learned=st.booleans())
def test_random_masks_and_blocks_on_cpu(window: int, block: int, causal: bool, sq: int, heads: tuple,
                                        learned: bool) -> None:
    """cpu's backward kernels against the reference for drawn windows, block sizes, lengths and head groups, with or
    without a learned relative bias (its gradient scatter-added by the threads into their partials)."""
    pytest.importorskip("torch_mlir")
    hq, hkv = heads
    rel = "k <= q and q - k" if causal else "abs(q - k)"
    bias = "score=bias(table=table), " if learned else ""
    src = (f"mask w(q, k) = {rel} < {window}\n"
           f"score bias(s, b, h, q, k; table: f32[{hq}, {2 * sq - 1}]) = s + table[h, q - k + {sq - 1}]\n"
           f"model M(q: f32[1, {hq}, {sq}, 16], k: f32[1, {hkv}, {sq}, 16], v: f32[1, {hkv}, {sq}, 16]) -> "
           f"f32[1, {hq}, {sq}, 16] {{\n    param table: f32[{hq}, {2 * sq - 1}]\n"
           f"    return attention(q, k, v, {bias}mask=w)\n}}\n")
    rng = np.random.default_rng(window * 100 + sq)
    table = rng.standard_normal((hq, 2 * sq - 1)).astype(np.float32)
    xs = [rng.standard_normal((1, h, sq, 16)).astype(np.float32) for h in (hq, hkv, hkv)]
    dy = rng.standard_normal((1, hq, sq, 16)).astype(np.float32)
    got = {}
    for target in ("reference", "cpu"):
        pipeline = backends.get(target).PIPELINE.replace(
            "sparsify-attention", f"sparsify-attention{{block_q={block},block_k={block}}}")
        m = sparsa.compile(src, target=target, passes=pipeline)
        m.load_weights({"table": table})
        got[target] = m.vjp(*xs)[1](dy)
    for n in ("q", "k", "v", "table"):
        np.testing.assert_allclose(got["cpu"][n], got["reference"][n], rtol=1e-4, atol=1e-5, err_msg=f"d{n}")
