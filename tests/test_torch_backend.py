"""torch.compile(model, backend="sparsa"): modules in common styles give the eager result; unsupported ops
run in PyTorch, are counted and logged; symbolic sizes avoid recompiles; the backend is found by name."""

from __future__ import annotations

import importlib.util

import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

from sparsa.ir import print_module  # noqa: E402
from sparsa.ir.diagnostics import SparsaError  # noqa: E402
from sparsa.runtime.torch_backend import SparsaBackend  # noqa: E402


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.ln = torch.nn.LayerNorm(16)
        self.up, self.down = torch.nn.Linear(16, 32), torch.nn.Linear(32, 16)

    def forward(self, x):
        return x + self.down(F.gelu(self.up(self.ln(x)), approximate="tanh"))


class WindowAttention(torch.nn.Module):
    """Attention with a sliding-window mask built from arange comparisons, as model code writes it."""

    def __init__(self, window=4):
        super().__init__()
        self.qkv = torch.nn.Linear(16, 48)
        self.window = window

    def forward(self, x):
        B, S, _ = x.shape
        q, k, v = self.qkv(x).view(B, S, 3, 2, 8).permute(2, 0, 3, 1, 4)
        i, j = torch.arange(S, device=x.device)[:, None], torch.arange(S, device=x.device)[None, :]
        mask = (j <= i) & (i - j < self.window)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(B, S, 16)


class PaddedBiasAttention(WindowAttention):
    """The window as an additive bias padded to a multiple of 8 and sliced back: SDPA's alignment of a mask
    on CUDA, written out (with a dynamic length the padding's width is S-dependent)."""

    def forward(self, x):
        B, S, _ = x.shape
        q, k, v = self.qkv(x).view(B, S, 3, 2, 8).permute(2, 0, 3, 1, 4).unbind(0)
        i, j = torch.arange(S, device=x.device)[:, None], torch.arange(S, device=x.device)[None, :]
        bias = torch.where((j <= i) & (i - j < self.window), 0.0, float("-inf"))
        bias = F.pad(bias, (0, (8 - S % 8) % 8))[..., :S]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias).transpose(1, 2).reshape(B, S, 16)


class Causal(torch.nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


class Router(torch.nn.Module):
    """A softmax router with top-2 and renormalization, plus an op Sparsa does not import (sort)."""

    def __init__(self):
        super().__init__()
        self.gate = torch.nn.Linear(16, 8, bias=False)

    def forward(self, x):
        probs = torch.softmax(self.gate(x), dim=-1)
        w, idx = torch.topk(probs, 2)
        return w / w.sum(-1, keepdim=True), idx, torch.sort(probs, dim=-1).values


def check(module, *inputs, backend=None, **compile_kwargs):
    backend = backend or SparsaBackend()
    with torch.no_grad():
        compiled = torch.compile(module, backend=backend, **compile_kwargs)
        got, want = compiled(*inputs), module(*inputs)
    got, want = (got, want) if isinstance(got, tuple) else ((got,), (want,))
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape
        scale = max(float(w.abs().max()), 1.0) if w.is_floating_point() else 1.0
        assert float((g.float() - w.float()).abs().max()) <= 1e-4 * scale
    return backend


def test_mlp_matches_eager():
    backend = check(MLP(), torch.randn(2, 5, 16))
    assert backend.stats["partitions compiled"] >= 1 and not backend.fallbacks


def test_window_attention_becomes_a_masked_attention_op():
    backend = check(WindowAttention(), torch.randn(2, 150, 16))
    ir = "".join(print_module(p.module) for p in backend.partitions)
    assert "attn.attention" in ir and 'kernel = "block-sparse"' in ir and not backend.fallbacks
    assert 'map = "1x1x3x3:P1E2;P2E1;E1P2"' in ir  # the mask became a symbolic predicate, classified at compile time


def test_causal_sdpa():
    q, k, v = (torch.randn(1, 2, 9, 8) for _ in range(3))
    backend = check(Causal(), q, k, v)
    assert "attn.attention" in "".join(print_module(p.module) for p in backend.partitions)


def test_unsupported_ops_fall_back_and_are_logged(monkeypatch, capfd):
    from sparsa.runtime.report import REPORT

    monkeypatch.setenv("SPARSA_LOG", "fallbacks")
    monkeypatch.setattr(REPORT, "_said", set())  # each (op, reason) is said once a process: an earlier test's
    backend = check(Router(), torch.randn(7, 16))
    assert backend.fallbacks == {"aten.sort.default": 1}
    assert "sparsa: falls back to PyTorch for aten.sort.default" in capfd.readouterr().err


class TransposedResult(torch.nn.Module):
    """A partition's result traced as a transpose: sort (not imported) reads it, a view of its transpose (valid
    in that layout only) stays in PyTorch with nothing to gain, and the graph returns it, for its caller to view."""

    def forward(self, x, w):
        y = torch.relu(x @ w).t()
        return torch.sort(y, 0).values, y.t().view(-1) * 2, y


@pytest.mark.parametrize("dynamic", [False, True])
def test_results_pytorch_reads_keep_their_traced_layout(dynamic):
    backend = SparsaBackend()
    compiled = torch.compile(TransposedResult(), backend=backend, dynamic=dynamic)
    for n in (5, 9):
        x, w = torch.randn(n, 6), torch.randn(6, 7)
        got, want = compiled(x, w), TransposedResult()(x, w)
        for g, e in zip(got, want, strict=True):
            assert g.stride() == e.stride() and torch.allclose(g, e, atol=1e-5)
        assert torch.equal(got[2].t().view(-1), got[2].t().reshape(-1))  # the caller's view works as on eager's
    assert backend.stats["partitions compiled"] >= 1 and backend.fallbacks == {"aten.sort.default": 2 - dynamic}


def test_inputs_pytorch_reads_are_laid_out_as_traced():
    """A backward graph's input saved by a forward partition comes compact, where it was traced as a transpose;
    PyTorch's view of its transpose (valid in the traced layout only) still works."""
    from torch.fx.experimental.proxy_tensor import make_fx

    def graph(y, w):
        return torch.sort(y.t().view(-1) * 2).values, torch.relu(y @ w)

    y, w = torch.randn(7, 5).t(), torch.randn(7, 3)
    backend = SparsaBackend()
    fused = backend.compile_aten(make_fx(graph, tracing_mode="fake")(y, w), [y, w])
    assert backend.stats["inputs laid out as traced (PyTorch reads them)"] == 1
    compact = y.contiguous()
    for got, want in zip(fused([compact, w]), graph(y, w), strict=True):
        assert torch.allclose(got, want, atol=1e-5)


class GraphBreakFragments(torch.nn.Module):
    """What a graph break leaves a backend: pointwise ops and a mask from comparisons, no matmul."""

    def forward(self, x, idx):
        mask = (idx[:, :, None] == torch.arange(4)).sum(1) > 0
        return F.silu(x) * x, mask


@pytest.mark.parametrize("partitions", ["worthwhile", "all"])
def test_fragments_without_gain_stay_in_pytorch(partitions, monkeypatch, capfd):
    """By default a partition of pointwise, view and reduction ops alone runs in PyTorch, counted in stats
    but not as a fallback; options={"partitions": "all"} compiles it."""
    monkeypatch.setenv("SPARSA_LOG", "fallbacks")
    backend = check(GraphBreakFragments(), torch.randn(9, 40), torch.randint(0, 4, (9, 2)),
                    backend=SparsaBackend({"partitions": partitions}))
    assert not backend.fallbacks and "falls back" not in capfd.readouterr().err
    left = backend.stats["partitions left to PyTorch (nothing to gain)"]
    assert (left, len(backend.partitions)) == ((1, 0) if partitions == "worthwhile" else (0, 1))
    with pytest.raises(SparsaError, match="unknown partitions option 'some'"):
        SparsaBackend({"partitions": "some"})


class BoolArithmetic(torch.nn.Module):
    """Bools in arithmetic, promoted as torch does (Switch routing multiplies a mask by token counts)."""

    def forward(self, x, ids):
        mask = x > 0
        return (mask * ids).sum(-1), mask * 3, mask + 0.5, ids + mask


def test_bools_promote_in_arithmetic():
    backend = check(BoolArithmetic(), torch.randn(6, 5), torch.randint(0, 9, (6, 5)),
                    backend=SparsaBackend({"partitions": "all"}))
    assert len(backend.partitions) == 1 and not backend.fallbacks


class Clamps(torch.nn.Module):
    """Mamba2's `clamp(dt, 0.0, inf)` and the other clamp forms: scalar, one-sided, tensor bounds, integers."""

    def forward(self, x, lo, ids):
        return (torch.clamp(x, 0.0, float("inf")), x.clamp(-0.5, 0.5), x.clamp_min(0.1), x.clamp_max(-0.1),
                torch.clamp(x, lo, lo + 1.0), ids.clamp(2, 5), torch.clamp(x, max=0.25))


class PaddingPositions(torch.nn.Module):
    """Positions from a padding mask as model code computes them: `cumsum` of a bool (torch sums it in int64),
    then an embedding lookup by them and a matmul."""

    def __init__(self):
        super().__init__()
        self.pos, self.proj = torch.nn.Embedding(16, 8), torch.nn.Linear(8, 8)

    def forward(self, x, ids):
        keep = ids.ne(0)
        return self.proj(x + self.pos(torch.cumsum(keep, dim=1) * keep)), keep.cumsum(-1)


def test_cumsum_of_bools_counts_in_int64():
    backend = check(PaddingPositions(), torch.randn(2, 7, 8), torch.tensor([[0, 0, 3, 4, 5, 6, 7], [1, 2, 3, 4, 0, 0, 0]]))
    assert len(backend.partitions) == 1 and not backend.fallbacks


class TopkAcrossRows(torch.nn.Module):
    """A supported op the importer refuses in one form (topk along the first axis) between matmuls."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Linear(16, 16)

    def forward(self, x):
        y = torch.relu(self.w(x))
        top, _ = y.topk(2, dim=0)
        return self.w(y) @ top.t()


def test_a_node_that_fails_to_import_is_left_out_alone():
    """Only the refused node runs in PyTorch, with the importer's reason; what is around it compiles."""
    import sparsa

    sparsa.report().clear()
    backend = check(TopkAcrossRows(), torch.randn(8, 16))
    assert backend.fallbacks == {"aten.topk.default": 1} and len(backend.partitions) == 2
    assert backend.stats["nodes left out of their partition"] == 1
    assert [why for _, why in sparsa.report().fallbacks] == [
        "not imported: topk other than the largest along the last axis"]


class RopeTables(torch.nn.Module):
    """What rope set-ups compute in the graph: aranges with steps (int and float), a scalar to a tensor power,
    a reciprocal; and xIELU's expm1."""

    def forward(self, x, t):
        inv = 1.0 / (10000.0 ** (torch.arange(0, 8, 2, dtype=torch.int64).float() / 8))
        pos = torch.arange(3, 20, 3) + torch.arange(0.5, 3.0, 0.5).sum()
        down = torch.arange(10, 0, -4, dtype=torch.float32)
        return (x * inv + torch.reciprocal(t) + torch.pow(2.0, x), pos, down, torch.expm1(x.clamp(max=0.1)),
                torch.arange(1, 9, 2).reciprocal())


def test_aranges_with_steps_powers_of_scalars_reciprocals_and_expm1_import():
    backend = check(RopeTables(), torch.randn(5, 4), torch.rand(5, 4) + 0.5, backend=SparsaBackend({"partitions": "all"}))
    assert len(backend.partitions) == 1 and not backend.fallbacks


class Flips(torch.nn.Module):
    """flip along one and two dims (autograd's reversed cumulative sum: flip(cumsum(flip(g))))."""

    def forward(self, x):
        return torch.flip(torch.cumsum(torch.flip(x, [-1]), -1), [-1]) @ x.t(), x.flip(0, 1), x.flip([])


@pytest.mark.parametrize("target", ["reference", "cpu", "triton"])
def test_flips_import(target):
    if target == "triton":
        pytest.importorskip("triton")
    backend = check(Flips(), torch.randn(6, 5), backend=SparsaBackend({"target": target}))
    assert len(backend.partitions) == 1 and not backend.fallbacks


class EmptyPieces(torch.nn.Module):
    """JetMoE splits its tokens by expert with split_with_sizes: a piece may have no rows (a static 0 dim)."""

    def forward(self, x, w):
        a, b, c = torch.split(x, [5, 0, 2])
        return torch.cat([torch.relu(a @ w), b @ w, c @ w]), b.t() @ b


def test_ops_on_empty_pieces_compile_on_cpu():
    """A matmul with no rows, or summing over none: nothing to tile (MLIR's transform interpreter crashed the
    process tiling such an op)."""
    pytest.importorskip("torch_mlir")
    backend = check(EmptyPieces(), torch.randn(7, 16), torch.randn(16, 8), backend=SparsaBackend({"target": "cpu"}))
    assert len(backend.partitions) == 1 and not backend.fallbacks


class ComplexRope(torch.nn.Module):
    """Rotary embedding in complex numbers, as Llama 4 and DeepSeek-V2 write it (polar, view_as_complex, a complex
    product, view_as_real), with a complex input (a precomputed table) and a complex result (with a conjugate)."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(16, 16)

    def forward(self, x, pos, table):
        angles = pos[:, None].float() * torch.arange(8).float()
        q = self.proj(x)
        z = torch.view_as_complex(q.reshape(q.shape[0], 8, 2))
        rotated = torch.view_as_real(z * torch.polar(torch.ones_like(angles), angles) * table).flatten(1)
        return rotated @ q.t(), z * 2.0 + z.conj()


@pytest.mark.parametrize("target", ["reference", "cpu"])
def test_complex_rotary_embeddings_import_as_pairs_of_reals(target):
    torch.manual_seed(0)
    model, x, pos = ComplexRope(), torch.randn(6, 16), torch.arange(6)
    table = torch.polar(torch.rand(6, 8) + 0.5, torch.randn(6, 8))
    backend = SparsaBackend({"target": target})
    with torch.no_grad():
        got, want = torch.compile(model, backend=backend)(x, pos, table), model(x, pos, table)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    assert len(backend.partitions) == 1 and not backend.fallbacks
    part = backend.partitions[0]
    assert part.complex_pos and part.complex_out == {1}


def test_clamps_import():
    backend = check(Clamps(), torch.randn(6, 5), torch.randn(5), torch.randint(0, 9, (6, 5)),
                    backend=SparsaBackend({"partitions": "all"}))
    assert len(backend.partitions) == 1 and not backend.fallbacks


class ScaledProducts(torch.nn.Module):
    """addmm and baddbmm with and without alpha and beta (BLOOM's ALiBi scores: baddbmm(alibi, q, k, beta=1,
    alpha=1/sqrt(d))), beta 0 included: that bias is not read, its NaNs included."""

    def forward(self, x, w, bias, q, k, alibi):
        return (torch.addmm(bias, x, w), torch.addmm(bias, x, w, beta=0.5, alpha=2.0),
                torch.baddbmm(alibi, q, k, alpha=0.25), torch.baddbmm(torch.full_like(alibi, float("nan")), q, k,
                                                                       beta=0.0, alpha=3.0))


@pytest.mark.parametrize("target", ["reference", "cpu"])
def test_addmm_and_baddbmm_with_alpha_and_beta_import(target):
    if target == "cpu":
        pytest.importorskip("torch_mlir")
    backend = check(ScaledProducts(), torch.randn(6, 5), torch.randn(5, 7), torch.randn(7), torch.randn(4, 3, 8),
                    torch.randn(4, 8, 3), torch.randn(4, 1, 3), backend=SparsaBackend({"partitions": "all",
                                                                                       "target": target}))
    assert len(backend.partitions) == 1 and not backend.fallbacks


class GroupRouting(torch.nn.Module):
    """DeepSeek-V3's group-limited routing as its model code writes it (scatter of the chosen groups,
    masked_fill, topk, gather), a Switch-style max.dim, and an in-place assembly of q from two halves."""

    def __init__(self, experts=8, groups=4, topk_group=2, k=2):
        super().__init__()
        self.gate = torch.nn.Linear(16, experts, bias=False)
        self.groups, self.topk_group, self.k = groups, topk_group, k

    def forward(self, x, rot):
        scores = self.gate(x).sigmoid()
        T, E = scores.shape
        group_scores = scores.view(T, self.groups, -1).topk(2, dim=-1)[0].sum(dim=-1)
        group_idx = torch.topk(group_scores, k=self.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
        score_mask = group_mask.unsqueeze(-1).expand(T, self.groups, E // self.groups).reshape(T, -1)
        masked = scores.masked_fill(~score_mask.bool(), 0.0)
        idx = torch.topk(masked, k=self.k, dim=-1)[1]  # sorted=False: any order is right (Sparsa's is sorted)
        weights = scores.gather(1, idx)
        top, arg = scores.max(dim=-1)
        q = x.new_empty(T, 24)
        q[:, :-8] = x
        q[:, 16:] = rot
        causal = torch.ones(T, T).tril() + torch.ones(T, T).triu(1) * 2
        return weights / weights.sum(-1, keepdim=True), idx, top, arg, q, causal, (idx >= 0).all()


@pytest.mark.parametrize(("sizes", "tokens"), [((8, 4, 2, 2), 11), ((64, 8, 4, 8), 50)])
def test_group_routing_scatter_gather_and_in_place_assembly_import(sizes, tokens):
    backend = check(GroupRouting(*sizes), torch.randn(tokens, 16), torch.randn(tokens, 8))
    assert not backend.fallbacks and len(backend.partitions) == 1


class DenseRouting(torch.nn.Module):
    """Llama 4's router and routed input as its model code writes them: the top-k logits scattered into a tensor of
    -inf, sigmoid, the tokens repeated once per expert and scaled by their scores; and a repeat with more repeats
    than dims."""

    def __init__(self, experts=4, k=2):
        super().__init__()
        self.gate, self.k = torch.nn.Linear(16, experts, bias=False), k

    def forward(self, x):
        logits = self.gate(x)
        top, idx = torch.topk(logits, self.k, dim=1)
        scores = torch.full_like(logits, float("-inf")).scatter_(1, idx, top).sigmoid()
        routed = x.repeat(scores.shape[1], 1) * scores.transpose(0, 1).reshape(-1, 1)
        return routed @ self.gate.weight.t(), x.repeat(2, 1, 3)


@pytest.mark.parametrize("dynamic", [False, True])
def test_scatter_at_top_k_indices_and_repeat_import(dynamic):
    backend = check(DenseRouting(), torch.randn(11, 16), dynamic=dynamic)
    assert not backend.fallbacks and len(backend.partitions) == 1


class ScatterAnywhere(torch.nn.Module):
    def forward(self, x, idx):
        return (torch.zeros_like(x).scatter(1, idx, x[:, :2]) + x) @ x.t()


def test_scatter_at_indices_that_may_repeat_stays_in_pytorch():
    """PyTorch keeps any one of the writes to a place indexed twice; Sparsa takes scatter only at a top-k's
    indices (distinct), and says why it leaves the others."""
    import sparsa

    idx = torch.stack([torch.randperm(6)[:2] for _ in range(5)])  # no repeats: eager's result is defined
    backend = check(ScatterAnywhere(), torch.randn(5, 6), idx)
    assert backend.fallbacks == {"aten.scatter.src": 1}
    assert "scatter at indices that may repeat" in str(sparsa.report())


class StridedStem(torch.nn.Module):
    """A padded strided convolution (left to PyTorch) and a patch embedding, then what Sparsa runs: under dynamic
    shapes the first's output is [B, 8, (H+1)//2, (W+1)//2], sizes no shape gives back the H they came from."""

    def __init__(self):
        super().__init__()
        self.stem, self.patch = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1), torch.nn.Conv2d(3, 8, 4, stride=4)

    def forward(self, x):
        y = self.stem(x)
        return torch.nn.functional.gelu(y) * y.mean(dim=(2, 3), keepdim=True), self.patch(x).relu()


@pytest.mark.parametrize("target", ["reference", "cpu"])
def test_sizes_a_fallback_op_divides_bind_as_names_of_their_own(target):
    """The partition after the strided convolution takes its floor-divided sizes as names of their own (they bound
    nothing and raised "which ((H+1)//2) is for no H" at the first call); the patch embedding is a matmul where
    its sizes are static (a symbolic one stays in PyTorch)."""
    if target == "cpu":
        pytest.importorskip("torch_mlir")
    backend = check(StridedStem(), torch.randn(2, 3, 16, 12), backend=SparsaBackend({"target": target}))
    assert backend.fallbacks == {"aten.convolution.default": 1}, dict(backend.fallbacks)
    backend = SparsaBackend({"target": target, "partitions": "all"})
    for shape in ((2, 3, 16, 12), (3, 3, 13, 20), (1, 3, 9, 9)):
        check(StridedStem(), torch.randn(*shape), backend=backend, dynamic=True)
    assert backend.fallbacks["aten.convolution.default"] >= 2 and len(backend.partitions) >= 1


class CausalConv(torch.nn.Module):
    """Mamba's causal depthwise convolution: padded by taps - 1 on both sides, the first L outputs kept."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv1d(6, 6, 4, groups=6, padding=3)

    def forward(self, x):
        return torch.nn.functional.silu(self.conv(x.transpose(1, 2))[..., :x.shape[1]]).transpose(1, 2)


@pytest.mark.parametrize("target", ["reference", "cpu"])
def test_depthwise_convolution_over_a_symbolic_length(target):
    """Under dynamic shapes the length is a symbol: its slices end at L + k - 3 (Mamba's convolutions fell back)."""
    if target == "cpu":
        pytest.importorskip("torch_mlir")
    backend = SparsaBackend({"target": target, "partitions": "all"})
    for L in (7, 12, 20):
        check(CausalConv(), torch.randn(2, L, 6), backend=backend, dynamic=True)
    assert not backend.fallbacks and backend.partitions, dict(backend.fallbacks)


class Projected(torch.nn.Module):
    """A linear layer first (a matmul: the cpu target takes the partition), then the case's ops."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)


def check_lengths(make, target, lengths):
    """make() compiled with dynamic=True for `target`, every partition taken, checked against eager on [2, L, 4]
    inputs at each length; returns the backend."""
    if target == "cpu":
        pytest.importorskip("torch_mlir")
    backend = SparsaBackend({"target": target, "partitions": "all"})
    for L in lengths:
        check(make(), torch.randn(2, L, 4), backend=backend, dynamic=True)
    return backend


class ChunkPad(Projected):
    """Mamba2's chunked form: padded to whole chunks by (8 - L % 8) % 8 rows, viewed as chunks, each chunk's
    cumulative sums less its last (a slice from -1, broadcast), through a matmul (so the cpu target takes it)."""

    def forward(self, x):
        B, L, D = x.shape
        c = torch.nn.functional.pad(self.proj(x), (0, 0, 0, (8 - L % 8) % 8)).view(B, -1, 8, D).cumsum(2)
        return (c - c[:, :, -1:, :]).exp().sum(2), c.sum(2) * 2


@pytest.mark.parametrize("target", ["reference", "cpu"])
def test_padding_to_whole_chunks_under_dynamic_shapes(target):
    """Sizes with remainders import (`Mod` written as %: the partition failed as a "symbolic size"), input shapes
    bind in any order (a solve for a symbol a later input binds divided by zero), and the last row of each chunk
    is one row in its type (it was `?`, which the cpu kernels read as 8 rows: wrong sums); results equal eager's.
    The padding by a size known at run time, never negative, imports too (it was left to PyTorch), empty at 32."""
    backend = check_lengths(ChunkPad, target, (12, 19, 32))
    assert backend.partitions and not backend.fallbacks, dict(backend.fallbacks)
    ir = "".join(print_module(p.module) for p in backend.partitions)
    assert "%(8))))%(8))))//8)}x1x4xf32>" in ir and "x?x" not in ir, ir  # (the chunks' count: padded length // 8)


class WindowTail(Projected):
    """A sliding window's cache (Mistral's): the last 64 rows of fewer rows or of more; and the last row, broadcast."""

    def forward(self, x):
        y = self.proj(x)
        return y[:, -64:] * 2, y - y[:, -1:], y[:, :-1] + y[:, 1:]


@pytest.mark.parametrize("target", ["reference", "cpu"])
def test_slices_from_the_end_under_dynamic_shapes(target):
    """Where PyTorch's guards know a slice's length, the import takes its start from it: x[:, -64:] of fewer rows
    is the whole axis (the IR takes a bound as inside the axis: 64 rows, an error at run time), the last row is
    one row (not `?`, which the cpu kernels read as L: wrong sums)."""
    backend = check_lengths(WindowTail, target, (12, 19, 70, 90))
    assert not backend.fallbacks and backend.partitions, dict(backend.fallbacks)


class LengthScaled(Projected):
    """Scaled by floats of the length (SymFloats under dynamic shapes: graph inputs of their own)."""

    def forward(self, x):
        y = self.proj(x)
        return y / (x.shape[1] / 3), (y > 0).long() * (x.shape[1] / 2), y.sum(1) / x.shape[1]


@pytest.mark.parametrize("target", ["reference", "cpu"])
def test_floats_of_sizes_under_dynamic_shapes(target):
    """A SymFloat comes in as a 0-d float32 argument read as a Python float (the tensor's float type; float32
    beside integers): its partition had failed whole ("symbolic size IntTrueDiv(s27, 3)")."""
    backend = check_lengths(LengthScaled, target, (5, 9, 14))
    assert not backend.fallbacks and backend.partitions, dict(backend.fallbacks)


class EvenOdd(Projected):
    """A scan level's pairs (Mamba's associative scan): even and odd rows of an even length, combined."""

    def forward(self, x):
        y = self.proj(x)
        e, o = y[:, ::2], y[:, 1::2]
        return torch.stack([e + o, e * o], 1).cumsum(2)


@pytest.mark.parametrize("target", ["reference", "cpu"])
def test_sizes_equal_under_dynamos_guards_are_one_size(target):
    """x[:, ::2] has (L+1)//2 rows and x[:, 1::2] L//2: equal where L is even, as Dynamo guards (Eq). The import
    takes a guard's equal sizes as one, and reshapes a value whose IR sizes differ from those PyTorch traced
    (a view, its element count checked at each call): their sum imports (it fell back: "do not broadcast")."""
    backend = check_lengths(EvenOdd, target, (12, 20, 34))
    assert not backend.fallbacks and backend.partitions, dict(backend.fallbacks)


def test_sizes_made_of_sizes_the_guards_fix_are_written_as_the_guards_make_them():
    """Mamba2's chunked scan within one chunk of 16: Dynamo's guards fix the chunks' count `(L + pad)//16` to 1 and
    the padded length to 16 chunks' rows. A size made of the count (2 of them per chunk) is 2, and the padding
    `(16 - L % 16) % 16` is `16 - L`: so the rows it leaves, `16 - pad`, are L (in NemotronH they met as sizes
    that did not broadcast)."""
    from torch._dynamo.source import ConstantSource
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv

    from sparsa.frontend import torch_types

    env = ShapeEnv()
    length = env.create_unspecified_symint_and_symbol(12, ConstantSource("L"), DimDynamic.DYNAMIC)
    pad = (16 - length % 16) % 16
    chunks = (length + pad) // 16
    assert chunks == 1 and 16 * chunks == length + pad  # (the guards broadcasting and the view to chunks make)
    token = torch_types._SIZES.set([length.node.expr])
    try:
        name = torch_types.as_dim(length)
        got = [torch_types.as_dim(d) for d in (2 * chunks, 16 - pad, length + pad, pad, length + 1)]
    finally:
        torch_types._SIZES.reset(token)
    assert got == [2, name, 16, f"16-{name}", f"{name}+1"]


def test_a_length_the_guards_leave_one_value_is_that_number():
    """Mamba's parallel scan at L = 12 takes log2(L) steps, each a view Dynamo guards: L//8 is 1, (L - 1)//2 is 5,
    L is even, so only 12 passes them. Every size of L is then its number (the backward's `L//8 + (L//4 - 1)//2 +
    1` rows, written `L//4` as met, were added to a select's 3: 2 ops left to PyTorch in Mamba and FalconMamba).
    Where the guards leave several values (L//8 is 1 alone: 8 to 15), L stays a name."""
    from torch._dynamo.source import ConstantSource
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv

    from sparsa.frontend import torch_types

    def sizes(guarded: bool) -> list:
        env = ShapeEnv()
        length = env.create_unspecified_symint_and_symbol(12, ConstantSource("L"), DimDynamic.DYNAMIC)
        assert length // 8 == 1 and (not guarded or (length - 1) // 2 == 5 and length % 2 == 0)
        token = torch_types._SIZES.set([])
        try:
            return [torch_types.as_dim(d) for d in (length, length // 4, length // 8 + (length // 4 - 1) // 2 + 1)]
        finally:
            torch_types._SIZES.reset(token)

    assert sizes(True) == [12, 3, 3]
    assert all(isinstance(d, str) for d in sizes(False))


@pytest.mark.parametrize("make", [MLP, WindowAttention, PaddedBiasAttention])
def test_new_sequence_lengths_do_not_recompile_once_dynamic(make):
    backend = SparsaBackend()
    module = make()
    with torch.no_grad():
        compiled = torch.compile(module, backend=backend)
        for S in (5, 5, 9, 13, 21):  # no multiple of 8: the padding of PaddedBiasAttention is never empty
            x = torch.randn(1, S, 16)
            torch.testing.assert_close(compiled(x), module(x), rtol=1e-4, atol=1e-5)
    assert backend.stats["graphs"] == 2  # the first static shape, then one dynamic graph for every length
    # the host computes the dynamic sizes (SymInt arithmetic): counted apart, not as ops falling back
    assert not backend.fallbacks and backend.stats["partitions compiled"] == 2
    if make is not MLP:
        assert all("attn.attention" in print_module(p.module) for p in backend.partitions)


class QKVWindowAttention(torch.nn.Module):
    """Sliding-window SDPA on q, k, v handed in as inputs (under dynamic=True every dim of theirs is symbolic,
    the head dim too)."""

    def forward(self, q, k, v):
        S = q.shape[-2]
        i, j = torch.arange(S)[:, None], torch.arange(S)[None, :]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=(j <= i) & (i - j < 6))


def test_symbolic_head_dim_gets_its_default_scale_at_run_time():
    """SDPA's default scale 1/sqrt(Dh) with Dh symbolic: q is scaled by a size computed at run time (the partition
    used to fall back whole: math.sqrt of a symbol); one graph serves every length and head dim."""
    backend = SparsaBackend()
    module = QKVWindowAttention()
    compiled = torch.compile(module, backend=backend, dynamic=True)
    with torch.no_grad():
        for S, dh in ((20, 16), (33, 16), (33, 24)):
            q, k, v = (torch.randn(1, 2, S, dh) for _ in range(3))
            torch.testing.assert_close(compiled(q, k, v), module(q, k, v), rtol=1e-4, atol=1e-5)
    assert backend.stats["graphs"] == 1 and backend.stats["partitions compiled"] == 1 and not backend.fallbacks
    assert "attn.attention" in print_module(backend.partitions[0].module)


def test_backend_is_registered_by_name_with_options():
    with torch.no_grad():
        module = MLP()
        compiled = torch.compile(module, backend="sparsa", options={"target": "reference"})
        x = torch.randn(3, 16)
        torch.testing.assert_close(compiled(x), module(x), rtol=1e-4, atol=1e-5)


def test_flex_attention_mods_become_mask_and_score_regions():
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    doc = torch.tensor([0] * 40 + [1] * 24 + [2] * 80)

    def mask_mod(b, h, q, kv):
        return (doc[q] == doc[kv]) & (kv <= q)

    def score_mod(s, b, h, q, kv):
        return s + (q - kv).to(s.dtype) * 0.01

    def attend(q, k, v):
        block_mask = create_block_mask(mask_mod, 1, 1, 144, 144, device="cpu")
        return flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask)

    q, k, v = (torch.randn(1, 2, 144, 16) for _ in range(3))
    backend = check(attend, q, k, v)
    ir = "".join(print_module(p.module) for p in backend.partitions)
    assert "attn.attention" in ir and "attn.block_map" in ir and "tensor.gather" in ir
    assert not backend.fallbacks  # create_block_mask's own work is dead once Sparsa builds the map


def test_flex_attention_sliding_window_gets_a_compile_time_map():
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def sliding(b, h, q, kv):
        return (kv <= q) & (q - kv < 32)

    def attend(q):
        return flex_attention(q, q, q, block_mask=create_block_mask(sliding, 1, 1, 256, 256, device="cpu"))

    backend = check(attend, torch.randn(1, 2, 256, 16))
    ir = "".join(print_module(p.module) for p in backend.partitions)
    assert 'map = "1x1x4x4:P1E3;P2E2;E1P2E1;E2P2"' in ir and not backend.fallbacks


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # without a GPU, triton kernels run in the interpreter


def test_triton_target_runs_the_partitions():
    """options={"target": "triton"} (the "auto" default on CUDA tensors): the block-sparse attention kernel
    and the fused MLP kernels run the partitions."""
    backend = check(WindowAttention().to(DEVICE), torch.randn(2, 150, 16, device=DEVICE),
                    backend=SparsaBackend({"target": "triton"}))
    assert backend.partitions and all(p.target == "triton" for p in backend.partitions) and not backend.fallbacks
    assert "attn_block_sparse_" in "".join(p.native.stages["kernels"] for p in backend.partitions)
    check(MLP().to(DEVICE), torch.randn(2, 5, 16, device=DEVICE), backend=SparsaBackend({"target": "triton"}))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need an NVIDIA GPU")
def test_cuda_graphs_replay_the_partitions():
    """options={"cuda_graphs": True}: one capture per input shape; new inputs are copied in, parameters are
    read in place (an in-place update shows), new parameter tensors capture again."""
    torch.manual_seed(0)
    model = WindowAttention().cuda()
    backend = SparsaBackend({"cuda_graphs": True})
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        for _ in range(3):
            x = torch.randn(2, 150, 16, device="cuda")
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)
        (graphs,) = [p.graphs for p in backend.partitions]
        assert graphs.captures == 1
        model.qkv.weight.add_(0.5)
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)
        assert graphs.captures == 1
        model.qkv.weight = torch.nn.Parameter(model.qkv.weight * 0.5)
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)
        assert graphs.captures == 2 and backend.stats["partitions compiled"] == 1 and not backend.fallbacks
        x = torch.randn(2, 90, 16, device="cuda")
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)


def test_cuda_graphs_option_is_checked():
    with pytest.raises(SparsaError, match="cuda_graphs option is true or false"):
        SparsaBackend({"cuda_graphs": "yes"})


def test_auto_target_picks_by_device():
    backend = check(MLP(), torch.randn(2, 5, 16))
    has_mlir = importlib.util.find_spec("torch_mlir") is not None
    assert [p.target for p in backend.partitions] == ["cpu" if has_mlir else "reference"]
    if torch.cuda.is_available():
        backend = check(MLP().cuda(), torch.randn(2, 5, 16, device="cuda"))
        assert [p.target for p in backend.partitions] == ["triton"]


def test_cpu_target_lowers_dense_partitions_through_mlir():
    pytest.importorskip("torch_mlir")
    dense = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.SiLU(), torch.nn.Linear(32, 16))
    backend = check(dense, torch.randn(10, 16), backend=SparsaBackend({"target": "cpu"}))
    assert [p.target for p in backend.partitions] == ["cpu"] and not backend.fallbacks
    assert "llvm.func" in backend.partitions[0].native.stages["llvm"]
    # layernorm, gelu and the rest of a transformer MLP block: all of it on the cpu target
    backend = check(MLP(), torch.randn(2, 5, 16), backend=SparsaBackend({"target": "cpu"}))
    assert {p.target for p in backend.partitions} == {"cpu"}
    assert not any("not supported by the cpu backend" in k for k in backend.stats)


class BiasAttention(torch.nn.Module):
    """A sliding window passed as an additive bias with -inf where blocked (SDPA's own form on CUDA)."""

    def forward(self, q, k, v):
        S = q.shape[2]
        i, j = torch.arange(S, device=q.device)[:, None], torch.arange(S, device=q.device)[None, :]
        blocked = (j > i) | (i - j >= 5)
        bias = torch.where(blocked, float("-inf"), 0.0).expand(q.shape[0], q.shape[1], S, S)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


def test_additive_bias_with_inf_where_blocked():
    q, k, v = (torch.randn(1, 2, 40, 16) for _ in range(3))
    backend = check(BiasAttention(), q, k, v)
    assert "attn.attention" in "".join(print_module(p.module) for p in backend.partitions) and not backend.fallbacks


class FourDimMask(torch.nn.Module):
    """A causal mask built in four dimensions, one unsqueeze at a time, expanded over the batch and turned
    into an additive bias (how transformers before 5.23 builds it)."""

    def forward(self, q, k, v):
        B, _, S, _ = q.shape
        i = torch.arange(S).unsqueeze(0).unsqueeze(1).unsqueeze(3)  # [1, 1, S, 1]
        j = torch.arange(S).unsqueeze(0).unsqueeze(1).unsqueeze(2)  # [1, 1, 1, S]
        allowed = (j <= i).expand(B, -1, S, S)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=torch.where(allowed, 0.0, float("-inf")))


class MaskInput(torch.nn.Module):
    """A [B, 1, S, S] mask handed in as data: it is read per element, index 0 on its broadcast axis."""

    def forward(self, q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def test_four_dim_arange_mask_is_analysed_at_compile_time():
    q, k, v = (torch.randn(2, 2, 70, 16) for _ in range(3))
    backend = check(FourDimMask(), q, k, v)
    ir = "".join(print_module(p.module) for p in backend.partitions)
    assert 'map = "1x1x2x2:P1E1;F1P1"' in ir and "tensor.gather" not in ir and not backend.fallbacks


@pytest.mark.parametrize("target", ["cpu", "reference"])
def test_mask_of_rank_four_as_input(target):
    if target == "cpu" and importlib.util.find_spec("torch_mlir") is None:
        pytest.skip("the cpu target needs torch-mlir")
    q, k, v = (torch.randn(2, 2, 24, 16) for _ in range(3))
    mask = torch.rand(2, 1, 24, 24) < 0.7
    mask[..., 0] = True  # no row fully masked (eager gives NaN there, the attention op zeros)
    backend = check(MaskInput(), q, k, v, mask, backend=SparsaBackend({"target": target}))
    ir = "".join(print_module(p.module) for p in backend.partitions)
    assert "attn.attention" in ir and backend.stats["partitions compiled"] == 1 and not backend.fallbacks


@pytest.mark.parametrize("target", ["cpu", "reference"])
def test_parameters_are_read_at_every_call_writes_through_data_included(target):
    """Without freezing, a parameter is an input like any other: writes through `.data` (which PyTorch does
    not count as a new version; EMA and init code use them) are seen at the next call."""
    if target == "cpu":
        pytest.importorskip("torch_mlir")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 24), torch.nn.SiLU(), torch.nn.Linear(24, 8)).eval()
    backend = SparsaBackend({"target": target})
    x = torch.randn(5, 16)
    with torch.no_grad():
        compiled = torch.compile(model, backend=backend)
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)
        version = model[0].weight._version
        model[0].weight.data.mul_(2.0)
        model[2].weight.data.copy_(torch.randn(8, 24))
        assert model[0].weight._version == version  # PyTorch does not see it as an update
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)
        assert not backend.partitions[0].cache  # nothing derived from the parameters is kept


def test_moe_expert_weights_written_through_data_are_seen_without_freezing():
    """transformers' grouped_mm MoE block: its expert weights reach the grouped GEMMs transposed; the cpu target
    packs them from the parameters at each call, so a write through `.data` is seen at the next call."""
    pytest.importorskip("torch_mlir")
    pytest.importorskip("transformers")
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    torch.manual_seed(0)
    config = MixtralConfig(hidden_size=32, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2)
    config._experts_implementation = "grouped_mm"
    block = MixtralSparseMoeBlock(config).eval()
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(1, 40, 32)
    backend = SparsaBackend({"target": "cpu"})
    with torch.no_grad():
        compiled = torch.compile(block, backend=backend)
        torch.testing.assert_close(compiled(x), block(x), rtol=1e-4, atol=1e-4)
        assert backend.stats["moe blocks recognized"] == 1
        kernels = backend.partitions[0].native.kernels.values()
        assert any(k.repacked for k in kernels)  # packed from the parameters, at each call
        block.experts.gate_up_proj.data.mul_(-1.5)
        block.experts.down_proj.data.copy_(torch.randn_like(block.experts.down_proj))
        torch.testing.assert_close(compiled(x), block(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("target", ["cpu", "reference"])
def test_with_freezing_parameters_feed_cached_results_until_they_change(target):
    """With freezing, a parameter's transpose (what only parameters feed) is computed once and reused; an
    in-place update of the parameter (a new version) or new parameter tensors recompute it."""
    if target == "cpu":
        pytest.importorskip("torch_mlir")
    model = torch.nn.Sequential(torch.nn.Linear(16, 24), torch.nn.SiLU(), torch.nn.Linear(24, 8)).eval()
    backend = SparsaBackend({"target": target, "freezing": True})
    x = torch.randn(5, 16)
    with torch.no_grad():
        compiled = torch.compile(model, backend=backend)
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)
        (part,) = backend.partitions
        if target == "cpu":  # built once, at the first call, knowing its parameters: their transposes are
            assert part.native.constant_args and list(part.builds) == [part.native.constant_args]  # the host's
        cached = dict(part.cache)
        assert cached  # the transposed weights
        compiled(x)
        assert all(part.cache[k] is v for k, v in cached.items())  # reused, not recomputed
        model[0].weight.mul_(2.0)  # in place: the same tensor at a new version
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)
        assert all(part.cache[k] is not v for k, v in cached.items())


def test_report_names_every_fallback_with_its_reason_and_logs_a_summary(caplog):
    """A bf16 MLP on the CPU stays in PyTorch; sparsa.report() says so, op by op, with the reason."""
    import logging

    import sparsa
    from sparsa.backends import base as backends

    if backends.get("cpu").unavailable() is not None:
        pytest.skip("no cpu target here")
    sparsa.report().clear()
    torch.manual_seed(0)
    model = MLP().to(torch.bfloat16)
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    with caplog.at_level(logging.INFO, logger="sparsa"), torch.no_grad():
        got = torch.compile(model, backend="sparsa", options={"target": "cpu"})(x)
    torch.testing.assert_close(got, model(x))
    rep = sparsa.report()
    assert len(rep.graphs) == 1 and not rep.partitions
    reasons = {why for (_, why) in rep.fallbacks}
    assert any("bf16" in why or "bfloat16" in why for why in reasons), reasons
    assert "falls back:" in str(rep) and "aten." in str(rep)
    assert any(r.name == "sparsa" and "sparsa: graph 0: partitions none compiled" in r.getMessage()
               for r in caplog.records)


def test_report_lists_partitions_and_their_targets():
    import sparsa

    sparsa.report().clear()
    torch.manual_seed(0)
    model = WindowAttention()
    x = torch.randn(1, 12, 16)
    with torch.no_grad():
        torch.compile(model, backend="sparsa", options={"target": "reference"})(x)
    rep = sparsa.report()
    assert rep.partitions and {p.target for p in rep.partitions} == {"reference"}
    assert any(p.ops["attn.attention"] for p in rep.partitions)


def test_training_graphs_compile_without_the_boxed_arguments_warning(recwarn):
    torch.manual_seed(0)
    model = MLP()
    x = torch.randn(4, 16, requires_grad=True)
    torch.compile(model, backend="sparsa", options={"target": "reference"})(x).sum().backward()
    assert x.grad is not None
    assert not [w for w in recwarn if "boxed arguments" in str(w.message)]


def _softcap(s, b, h, q, k):
    return 20.0 * torch.tanh(s / 20.0)


FLEX_MODS = {  # mask_mod, score_mod
    "causal with softcap": (lambda b, h, q, k: k <= q, _softcap),
    "sliding window": (lambda b, h, q, k: (k <= q) & (q - k < 24), None),
    "prefix LM": (lambda b, h, q, k: (k <= q) | (k < 16), None),
}


@pytest.mark.parametrize("mods", sorted(FLEX_MODS))
def test_flex_attention_at_new_shapes_compiles_to_sparsa_attention(mods):
    """A flex_attention module recompiled for a new batch and length (Dynamo then makes the sizes symbolic) ran
    into `int('((s0+127)//128)')` on the block count (a symbolic scalar is now counted at run time), and then
    its k and v got length symbols of their own, which the attention op refused (they are unified by a reshape
    checked at run time): every shape now runs Sparsa's attention, nothing falls back."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    import sparsa

    mask_mod, score_mod = FLEX_MODS[mods]

    class Causal(torch.nn.Module):
        def forward(self, q, k, v):
            S = q.shape[2]
            return flex_attention(q, k, v, score_mod=score_mod,
                                  block_mask=create_block_mask(mask_mod, None, None, S, S, device="cpu"))

    sparsa.report().clear()
    model = Causal()
    compiled = torch.compile(model, backend="sparsa")
    for B, S in ((1, 64), (2, 96), (1, 130)):
        q, k, v = (torch.randn(B, 2, S, 16) for _ in range(3))
        torch.testing.assert_close(compiled(q, k, v), model(q, k, v), rtol=1e-4, atol=1e-5)
    report = sparsa.report()
    assert len(report.graphs) == 3 and not report.fallbacks, str(report)
    assert all(any(p.ops["attn.attention"] for p in g.partitions) for g in report.graphs)


@pytest.mark.parametrize("target", ["cpu", "reference"])
def test_flex_attention_document_mask_reading_the_length_at_new_shapes(target):
    """A document mask_mod that captures the document ids and the sequence length (`kv < S // 4`, a global
    prefix): at a new batch and length the length is symbolic, and the size arithmetic runs in the mod's
    graph. The captured length is a 0-d value computed outside the mask and read inside it; every shape runs
    Sparsa's attention (it used to fall back: "expected a tensor, got str", then "op floordiv")."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    import sparsa

    if target == "cpu":
        pytest.importorskip("torch_mlir")

    class Documents(torch.nn.Module):
        def forward(self, q, k, v, doc):
            S = q.shape[2]

            def mask(b, h, qi, ki):
                return ((doc[qi] == doc[ki]) & (ki <= qi)) | (ki < S // 4)

            return flex_attention(q, k, v, block_mask=create_block_mask(mask, None, None, S, S, device="cpu"))

    sparsa.report().clear()
    torch.manual_seed(0)
    model = Documents()
    compiled = torch.compile(model, backend="sparsa", options={"target": target})
    for B, S in ((1, 64), (2, 96), (1, 130)):
        q, k, v = (torch.randn(B, 2, S, 16) for _ in range(3))
        doc = torch.sort(torch.randint(0, 3, (S,))).values
        torch.testing.assert_close(compiled(q, k, v, doc), model(q, k, v, doc), rtol=1e-4, atol=1e-5)
    report = sparsa.report()
    assert len(report.graphs) == 3 and not report.fallbacks, str(report)
    assert all(any(p.ops["attn.attention"] for p in g.partitions) for g in report.graphs)


@pytest.mark.parametrize("target", ["cpu", "reference"])
def test_views_that_as_strided_reads_keep_pytorchs_storage(target):
    """as_strided reads its input's storage: a slice of a computed tensor, read so, must be PyTorch's view of
    the whole tensor, not a compact copy of its elements from a partition (longformer's chunking did this and
    differed from eager by 3e-4)."""
    if target == "cpu":
        pytest.importorskip("torch_mlir")

    def f(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        y = (x @ w)[:, :4]  # a view into the [6, 8] product's storage
        return torch.as_strided(y, (3, 6), (6, 1)) * 2.0 + torch.relu(x @ w).sum()

    torch.manual_seed(0)
    x, w = torch.randn(6, 5), torch.randn(5, 8)
    backend = SparsaBackend({"target": target})
    torch.testing.assert_close(torch.compile(f, backend=backend)(x, w), f(x, w), rtol=1e-5, atol=1e-5)
    assert backend.stats["partitions compiled"] >= 1
    assert any("as_strided reads" in why for why in sparsa_report_reasons())


def sparsa_report_reasons() -> list[str]:
    import sparsa

    return [why for graph in sparsa.report().graphs for _, why in graph.fallbacks]


def _rounded_divisions(i, j, x, y):
    return (i.div(3, rounding_mode="trunc"), torch.div(i, j, rounding_mode="trunc"),
            torch.div(i, j, rounding_mode="floor"), torch.div(x, y, rounding_mode="trunc"),
            torch.div(x, y, rounding_mode="floor"), torch.div(x, 0.7, rounding_mode="trunc"))


@pytest.mark.parametrize("target", ["reference", "cpu"])
def test_divisions_with_a_rounding_mode_import(target: str) -> None:
    """div with rounding_mode "trunc" (toward 0: JetMoe's token of each routed slot) and "floor", of integers and
    floats, every pair of signs: equal to PyTorch's, in its dtypes, nothing left to it."""
    if target == "cpu":
        pytest.importorskip("torch_mlir")
    backend = SparsaBackend({"target": target})
    i, j = torch.arange(-10, 11), torch.tensor([3, -3, 4, -4, 7, -7, 1] * 3)
    x, y = torch.randn(21) * 5, torch.randn(21)
    got = torch.compile(_rounded_divisions, backend=backend)(i, j, x, y)
    for a, b in zip(got, _rounded_divisions(i, j, x, y), strict=True):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b)
    assert not backend.fallbacks, dict(backend.fallbacks)


class PastOffset(torch.nn.Module):
    """Positions read from a buffer at an offset (BigBird's `position_ids[:, past:past + L]`, past an int Dynamo
    makes a name under dynamic=True), embedded."""

    def __init__(self):
        super().__init__()
        self.register_buffer("pos", torch.arange(64)[None])
        self.emb = torch.nn.Embedding(64, 8)

    def forward(self, x, past=0):
        return self.emb(self.pos[:, past:past + x.shape[1]]) * x


@pytest.mark.parametrize("target", ["reference", "cpu"])
def test_a_size_only_a_slices_bounds_use_keeps_the_input_that_binds_it(target: str) -> None:
    """The offset is a name only the slice's start and stop use (its result is L long): the input that carries
    it was dropped as read by nothing, and the call failed to bind it (KeyError in the cpu host's plan). It is
    kept; values and gradients equal eager's at three lengths and offsets."""
    if target == "cpu":
        pytest.importorskip("torch_mlir")
    torch.manual_seed(0)
    model = PastOffset()
    backend = SparsaBackend({"target": target, "partitions": "all"})
    compiled = torch.compile(model, backend=backend, dynamic=True)
    for length, past in ((5, 0), (9, 3), (7, 2)):
        x = torch.randn(2, length, 8, requires_grad=True)
        got, want = compiled(x, past), model(x, past)
        torch.testing.assert_close(got, want)
        for a, b in zip(*(torch.autograd.grad(y.sum(), (x, model.emb.weight)) for y in (got, want)), strict=True):
            torch.testing.assert_close(a, b)
    assert not backend.fallbacks and backend.stats["partitions compiled"] == 2, dict(backend.fallbacks)
