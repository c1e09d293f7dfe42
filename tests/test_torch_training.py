"""torch.compile training with Sparsa's derivatives: masked SDPA's backward graph imports as attention's own rule
(the backward op over the block map), nothing of the forward or the backward falls back, and every gradient
equals eager PyTorch's."""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional


class SlidingAttention(torch.nn.Module):
    """Projections, heads split with unbind (select_backward in the backward graph), a boolean sliding-window mask
    built from positions, SDPA."""

    def __init__(self, dim: int = 64, heads: int = 2, window: int = 16):
        super().__init__()
        self.qkv, self.o, self.heads, self.window = torch.nn.Linear(dim, 3 * dim), torch.nn.Linear(dim, dim), heads, \
            window

    def forward(self, x):
        B, S, D = x.shape
        q, k, v = self.qkv(x).view(B, S, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        i = torch.arange(S, device=x.device)
        mask = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < self.window)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o(o.transpose(1, 2).reshape(B, S, D))


class RelativeBiasAttention(torch.nn.Module):
    """A learned relative position bias per head (T5/Swin style), read with a leading slice: rel[:, (k - q) + S - 1],
    added to causal scores as SDPA's float mask; its backward is an accumulating index_put."""

    def __init__(self, S: int, dim: int = 32, heads: int = 2):
        super().__init__()
        self.qkv, self.o, self.heads = torch.nn.Linear(dim, 3 * dim), torch.nn.Linear(dim, dim), heads
        self.rel = torch.nn.Parameter(torch.randn(heads, 2 * S - 1) * 0.1)

    def forward(self, x):
        B, S, D = x.shape
        q, k, v = self.qkv(x).view(B, S, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        i = torch.arange(S, device=x.device)
        bias = self.rel[:, i[None, :] - i[:, None] + S - 1].masked_fill(i[None, :] > i[:, None], float("-inf"))
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.o(o.transpose(1, 2).reshape(B, S, D))


@pytest.mark.parametrize("target", ["reference", "cpu"])
def test_a_learned_relative_bias_read_after_a_slice_trains(target: str) -> None:
    """aten.index with a leading None (rel[:, idx]) imports as a gather of the indexed axis moved to the front, and
    its backward, index_put with accumulate, as the scatter-add back: nothing falls back, losses and gradients (the
    bias table's among them) equal eager's."""
    SparsaBackend = _backend_for(target)

    torch.manual_seed(0)
    model = RelativeBiasAttention(40)
    ref = copy.deepcopy(model)
    backend = SparsaBackend({"target": target})
    _trains_as_eager(model, ref, backend, torch.randn(2, 40, 32))
    assert not backend.fallbacks, dict(backend.fallbacks)
    names = {op.NAME for part in backend.partitions for op in part.func.walk()}
    assert {"tensor.gather", "tensor.scatter_add"} <= names


def test_index_with_leading_slices_and_index_put_import_as_pytorch_indexes() -> None:
    """x[:, i] and x[:, :, i, j] (index dims where the first tensor index was, trailing axes kept) and
    index_put(accumulate=True) with repeated places against eager; a None between tensor indices stays in PyTorch
    with its reason."""
    from sparsa.runtime.torch_backend import SparsaBackend

    i = torch.tensor([[0, 2, 2], [1, 0, 3]])
    j = torch.tensor([1, 0, 1])

    def f(x, v):
        acc = torch.ops.aten.index_put.default(torch.zeros_like(x), [None, i[0]], v, True)
        return x[:, i] * 2, x[:, :, i, j], acc

    x, v = torch.randn(3, 4, 5, 6), torch.randn(3, 3, 5, 6)
    backend = SparsaBackend({"target": "reference"})
    got = torch.compile(f, backend=backend)(x, v)
    for a, b in zip(got, f(x, v), strict=True):
        torch.testing.assert_close(a, b)
    assert not backend.fallbacks, dict(backend.fallbacks)
    backend = SparsaBackend({"target": "reference"})
    x = torch.randn(4, 4, 2, 6)
    torch.testing.assert_close(torch.compile(lambda x: x[i, :, j] + 1, backend=backend)(x), x[i, :, j] + 1)
    import sparsa

    reasons = [why for graph in sparsa.report().graphs for _, why in graph.fallbacks]
    assert any("None between or after" in why for why in reasons), reasons


def _routed(x, w, idx, cols):
    """Rows of x picked by an index (index_select), transformed, and added back at the same places (index_add,
    repeated places adding up): JetMoe's experts' tokens; and columns added at places, scaled (alpha)."""
    y = torch.index_select(x, 0, idx) @ w
    back = torch.zeros(x.shape[0], w.shape[1]).index_add(0, idx, y) + torch.index_select(x, 1, cols).sum()
    return back, torch.index_add(x, 1, cols, x[:, :3], alpha=2.0)


@pytest.mark.parametrize("target", ["reference", "cpu"])
def test_index_select_and_index_add_train_as_gathers_and_scatter_adds(target: str) -> None:
    """index_select and index_add (and index_select's backward, an index_add) stayed in PyTorch ("no import");
    they import as aten.index and index_put(accumulate) do: the values and gradients equal eager's."""
    SparsaBackend = _backend_for(target)
    backend = SparsaBackend({"target": target})
    compiled = torch.compile(_routed, backend=backend)
    idx, cols = torch.tensor([0, 2, 2, 5, 1]), torch.tensor([4, 0, 4])
    x, w = torch.randn(6, 5, requires_grad=True), torch.randn(5, 4, requires_grad=True)
    got, want = compiled(x, w, idx, cols), _routed(x, w, idx, cols)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)
    grads = [torch.autograd.grad(sum(t.square().sum() for t in out), (x, w)) for out in (got, want)]
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)
    assert not backend.fallbacks, dict(backend.fallbacks)
    names = {op.NAME for part in backend.partitions for op in part.func.walk()}
    assert {"tensor.gather", "tensor.scatter_add"} <= names


def _backend_for(target: str) -> type:
    """SparsaBackend, after skipping the cpu target where torch-mlir is missing."""
    if target == "cpu":
        pytest.importorskip("torch_mlir")
    from sparsa.runtime.torch_backend import SparsaBackend

    return SparsaBackend


def _train(model, backend, x, steps: int = 2):
    """Two SGD steps; the losses and the last step's gradients."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    f = torch.compile(model, backend=backend) if backend is not None else model
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = f(x).square().mean()
        loss.backward()
        losses.append(loss.item())
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
    return losses, grads


def _trains_as_eager(model, ref, backend, data, train=None, loss_atol: float = 1e-6, grad_atol: float = 1e-5):
    """`model` trained under `backend` and `ref` (its copy) eagerly, by `train` (default `_train`): the losses and
    every gradient of the last step equal within float32 tolerance; returns both runs' gradients."""
    train = train or _train
    losses, grads = train(model, backend, data)
    want_losses, want_grads = train(ref, None, data)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(want_losses), rtol=1e-5, atol=loss_atol)
    for n, g in want_grads.items():
        torch.testing.assert_close(grads[n], g, rtol=1e-4, atol=grad_atol, msg=n)
    return grads, want_grads


@pytest.mark.parametrize("target", ["reference", "cpu"])
def test_sliding_window_sdpa_trains_on_sparsas_backward(target: str) -> None:
    """Two optimizer steps under backend=sparsa equal eager's; the backward graph holds attention's dQ and dK/dV
    ops reading a block map (the mask is made again from positions in the backward graph, not saved), and
    no node of either graph is left to PyTorch."""
    SparsaBackend = _backend_for(target)

    torch.manual_seed(0)
    model = SlidingAttention()
    ref = copy.deepcopy(model)
    x = torch.randn(2, 150, 64)
    backend = SparsaBackend({"target": target})
    _trains_as_eager(model, ref, backend, x)
    assert not backend.fallbacks, dict(backend.fallbacks)
    assert backend.stats["saved tensors made again in the backward"] >= 1
    ops = [op for part in backend.partitions for op in part.func.walk()]
    grad_ops = [op for op in ops if op.NAME == "attn.attention_grad"]
    assert len(grad_ops) == 1 and all(op.block_map is not None for op in grad_ops)
    assert any(op.NAME == "attn.attention_lse" for op in ops)


def test_a_bias_tensor_is_added_and_masks_where_minus_inf() -> None:
    """An additive mask given as a tensor (not where(mask, 0, -inf) in the graph): its finite values add to the
    scores, its -inf entries disallow; forward and backward both, rows of -inf only giving zeros."""
    from sparsa.runtime.torch_backend import SparsaBackend

    torch.manual_seed(1)
    S = 70
    bias = torch.randn(S, S) * 0.5
    bias[torch.rand(S, S) < 0.4] = float("-inf")
    bias[:, 0] = 0.0  # every row allows something (PyTorch's rows of -inf only are NaN)

    def f(q, k, v, bias):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)

    backend = SparsaBackend({"target": "reference"})
    qkv = [torch.randn(1, 2, S, 16, requires_grad=True) for _ in range(3)]
    ref = [t.detach().clone().requires_grad_() for t in qkv]
    dy = torch.randn(1, 2, S, 16)
    torch.compile(f, backend=backend)(*qkv, bias).backward(dy)
    f(*ref, bias).backward(dy)
    assert not backend.fallbacks, dict(backend.fallbacks)
    names = {op.NAME for part in backend.partitions for op in part.func.walk()}
    assert {"attn.attention_lse", "attn.attention_grad", "tensor.gather"} <= names
    for a, b in zip(qkv, ref, strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_and_embedding_backward_import(reduction: str) -> None:
    """log_softmax, nll_loss (ignored targets, each reduction) and the embedding's backward (a padding index)
    import as tensor ops, forward and backward; the gradients equal eager's."""
    from sparsa.runtime.torch_backend import SparsaBackend

    torch.manual_seed(2)
    emb, proj = torch.nn.Embedding(11, 8, padding_idx=0), torch.nn.Linear(8, 5)
    ids = torch.tensor([[0, 3, 4, 4], [7, 0, 10, 2]])
    target = torch.tensor([1, -100, 4, 0, 2, 3, -100, 1])

    scale = torch.arange(8.0)

    def f(ids, target, scale):
        loss = F.cross_entropy(proj(emb(ids)).reshape(-1, 5), target, reduction=reduction)
        return loss if reduction != "none" else (loss * scale).sum()

    backend = SparsaBackend({"target": "reference"})
    torch.compile(f, backend=backend)(ids, target, scale).backward()
    got = [p.grad.clone() for p in (emb.weight, proj.weight, proj.bias)]
    for p in (emb.weight, proj.weight, proj.bias):
        p.grad = None
    f(ids, target, scale).backward()
    assert not backend.fallbacks, dict(backend.fallbacks)
    for a, p in zip(got, (emb.weight, proj.weight, proj.bias), strict=True):
        torch.testing.assert_close(a, p.grad, rtol=1e-5, atol=1e-6)
    assert (got[0][0] == 0).all()  # the padding row


def _train_lm(model, backend, ids, steps: int = 2):
    """A causal LM trained for `steps` SGD steps on `ids` (its own labels), compiled with `backend` (None: eager):
    the losses and the last step's gradients of the parameters that got one."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    f = torch.compile(model, backend=backend) if backend is not None else model
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = f(ids, labels=ids).loss
        loss.backward()
        losses.append(loss.item())
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        opt.step()
    return losses, grads


def test_tiny_mistral_trains_two_steps_with_nothing_left_to_pytorch() -> None:
    """transformers' Mistral (sliding window 8, grouped heads) trained for two SGD steps under backend=sparsa:
    the losses and every parameter's gradient equal eager's, and no node of any graph falls back (the window
    mask made again in the backward graph, the loss and the embedding's backward imported)."""
    pytest.importorskip("torch_mlir")
    transformers = pytest.importorskip("transformers")
    from sparsa.runtime.torch_backend import SparsaBackend

    torch.manual_seed(0)
    config = transformers.MistralConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=64, sliding_window=8)
    model = transformers.MistralForCausalLM(config)
    ref = copy.deepcopy(model)
    ids = torch.randint(0, 64, (2, 24))

    backend = SparsaBackend({"target": "cpu"})
    _trains_as_eager(model, ref, backend, ids, _train_lm, loss_atol=1e-5)
    assert not backend.fallbacks, dict(backend.fallbacks)
    names = {op.NAME for part in backend.partitions for op in part.func.walk()}
    assert {"attn.attention_lse", "attn.attention_grad"} <= names


@pytest.mark.parametrize("target", ["reference", "cpu"])
def test_tiny_gpt2_with_layer_norms_trains_with_nothing_left_to_pytorch(target: str) -> None:
    """transformers' GPT-2 (LayerNorm, GELU, causal SDPA, tied head) trained for two SGD steps: the forward's
    native_layer_norm gives the mean and 1/std its backward reads (they made the whole forward graph fall back),
    native_layer_norm_backward imports as layer norm's own rule from them; losses and gradients equal eager's."""
    if target == "cpu":
        pytest.importorskip("torch_mlir")
    transformers = pytest.importorskip("transformers")
    from sparsa.runtime.torch_backend import SparsaBackend

    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32, resid_pdrop=0.0,
                                     embd_pdrop=0.0, attn_pdrop=0.0)
    config._attn_implementation = "sdpa"
    model = transformers.GPT2LMHeadModel(config)
    ref = copy.deepcopy(model)
    backend = SparsaBackend({"target": target})
    _trains_as_eager(model, ref, backend, torch.randint(0, 64, (2, 24)), _train_lm, loss_atol=1e-5)
    assert not backend.fallbacks, dict(backend.fallbacks)
    names = {op.NAME for part in backend.partitions for op in part.func.walk()}
    assert {"tensor.layernorm", "tensor.rsqrt", "attn.attention_grad"} <= names, names


@pytest.mark.parametrize("target", ["reference", "cpu"])
def test_layer_norms_without_weight_or_bias_train_in_sparsa(target: str) -> None:
    """A layer norm with no weight or bias (OLMo's parameter-free one, `LayerNorm(bias=False)`) imports as layer norm
    with ones and zeros, forward and backward: transformers' OLMo trains two SGD steps with nothing left to PyTorch
    (its layer norms had split each graph into 11 partitions), and the gradients equal eager's."""
    if target == "cpu":
        pytest.importorskip("torch_mlir")
    transformers = pytest.importorskip("transformers")
    from sparsa.runtime.torch_backend import SparsaBackend

    torch.manual_seed(0)
    model = transformers.OlmoForCausalLM(transformers.OlmoConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=0))
    backend = SparsaBackend({"target": target})
    _trains_as_eager(model, copy.deepcopy(model), backend, torch.randint(0, 64, (2, 16)), _train_lm, loss_atol=1e-5)
    assert not backend.fallbacks, dict(backend.fallbacks)
    names = [op.NAME for part in backend.partitions for op in part.func.walk()]
    assert names.count("tensor.layernorm") >= 5, names

    torch.manual_seed(0)
    block = torch.nn.Sequential(torch.nn.Linear(16, 24), torch.nn.LayerNorm(24, bias=False), torch.nn.Linear(24, 8))
    backend = SparsaBackend({"target": target})
    _trains_as_eager(block, copy.deepcopy(block), backend, torch.randn(5, 16))
    assert not backend.fallbacks, dict(backend.fallbacks)


class VisionOps(torch.nn.Module):
    """Ops of vision transformers: patch embeddings (2-D convolutions of stride = kernel; 5 columns make 2 patches
    of 2), Swin's shifted windows (roll), Swin v2's cosine attention (F.normalize: a vector norm), other norms (their
    backward reads sign and isnan), a bilinear resize (BEiT's position bias: decomposed to _unsafe_index, its
    backward _unsafe_index_put), Swin's pooler (adaptive pooling: as_strided, as_strided_scatter)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(4, 4) * 0.5)
        self.patch = torch.nn.Conv2d(4, 3, kernel_size=2, stride=2)
        self.patch_wide = torch.nn.Conv2d(4, 2, kernel_size=(3, 1), stride=(3, 1), bias=False)
        self.pool = torch.nn.AdaptiveAvgPool1d(1)

    def forward(self, x):
        y = torch.einsum("bchw,cd->bdhw", x, self.w)
        patches = [self.patch(y), self.patch_wide(y), self.pool(y.flatten(2))]
        parts = [torch.roll(y, shifts=(1, -2), dims=(2, 3)), torch.roll(y, 5), F.normalize(y, dim=1),
                 F.interpolate(y, scale_factor=2, mode="bilinear"),
                 torch.linalg.vector_norm(y, ord=float("inf"), dim=-1), torch.linalg.vector_norm(y, ord=3, dim=(1, 2)),
                 torch.linalg.vector_norm(y, ord=1, dim=1, keepdim=True), torch.sign(y) * y, *patches]
        return torch.cat([p.flatten() for p in parts])


@pytest.mark.parametrize("target", ["reference", "cpu"])
def test_vision_ops_roll_norms_and_resizes_train_in_sparsa(target: str) -> None:
    SparsaBackend = _backend_for(target)

    torch.manual_seed(0)
    model = VisionOps()
    backend = SparsaBackend({"target": target, "partitions": "all"})
    _trains_as_eager(model, copy.deepcopy(model), backend, torch.randn(2, 4, 6, 5))
    assert not backend.fallbacks, dict(backend.fallbacks)


@pytest.mark.parametrize("target", ["reference", "cpu"])
def test_dropout_backward_imports_from_the_forward_mask(target: str) -> None:
    """native_dropout draws from PyTorch's generator and stays in PyTorch; its backward (dy times the kept mask,
    over 1 - p) imports: only the forward's dropout is left, and the gradients equal eager's from the same seed."""
    SparsaBackend = _backend_for(target)

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Dropout(0.3),
                                torch.nn.Linear(32, 8)).train()
    ref, x = copy.deepcopy(model), torch.randn(6, 16)
    backend = SparsaBackend({"target": target, "partitions": "all"})
    compiled = torch.compile(model, backend=backend)
    for f in (compiled, ref):
        torch.manual_seed(1)
        f(x).square().sum().backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)
    assert dict(backend.fallbacks) == {"aten.native_dropout.default": 1}, dict(backend.fallbacks)


def test_tiny_t5_trains_with_nothing_left_to_pytorch() -> None:
    """transformers' T5 (relative position buckets, encoder-decoder, its labels shifted right into the decoder's
    inputs by a select_scatter and a fill) trains two SGD steps: nothing falls back, losses and gradients as eager."""
    pytest.importorskip("torch_mlir")
    transformers = pytest.importorskip("transformers")
    from sparsa.runtime.torch_backend import SparsaBackend

    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=64, d_model=32, d_ff=64, d_kv=8, num_layers=2, num_heads=4,
                                   dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0)
    model = transformers.T5ForConditionalGeneration(config)
    ref = copy.deepcopy(model)
    backend = SparsaBackend({"target": "cpu"})
    _trains_as_eager(model, ref, backend, torch.randint(1, 64, (2, 12)), _train_lm, loss_atol=1e-5)
    assert not backend.fallbacks, dict(backend.fallbacks)


@pytest.mark.parametrize("target", ["reference", "cpu"])
def test_select_scatter_and_fill_import(target: str) -> None:
    """`s[..., 0] = c` (fill of the selected column with a 0-d tensor, select_scatter back) and fill with a number,
    compiled even alone ("all" partitions): the cpu target copies a 0-d value out to every element."""
    SparsaBackend = _backend_for(target)

    c = torch.tensor(3)

    def f(ids, x):
        s = ids.new_zeros(ids.shape)
        s[..., 1:] = ids[..., :-1].clone()
        s[..., 0] = c
        s[:, -1] = 7
        return s, x.fill_(2.5) * 2

    ids = torch.randint(0, 100, (2, 7))
    backend = SparsaBackend({"target": target, "partitions": "all"})
    got = torch.compile(f, backend=backend)(ids, torch.randn(3, 4))
    want = f(ids, torch.randn(3, 4))
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert not backend.fallbacks, dict(backend.fallbacks)
    assert backend.partitions


TINY_LMS = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2,
                                                            intermediate_size=64)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(num_experts=4, num_experts_per_tok=2,
                                                                intermediate_size=64, moe_intermediate_size=32,
                                                                head_dim=8)),
    "mamba": ("MambaConfig", "MambaForCausalLM", dict(state_size=8)),
}
@pytest.mark.parametrize("name", sorted(TINY_LMS))
def test_tiny_moe_and_state_space_models_train_two_steps_as_eager(name: str) -> None:
    """transformers' Mixtral, Qwen3-MoE and Mamba trained for two SGD steps under backend=sparsa: the losses and
    every parameter's gradient equal eager's, nothing stays in PyTorch, and the attention and the MoE blocks run on
    Sparsa's backward (the blocks folded before AOTAutograd: their expert weights' gradients are grouped GEMMs over
    the dispatch's segments, the router's through the top-k's rule)."""
    pytest.importorskip("torch_mlir")
    transformers = pytest.importorskip("transformers")
    from sparsa.runtime.torch_backend import SparsaBackend

    config_name, model_name, extra = TINY_LMS[name]
    torch.manual_seed(0)
    common = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2)
    if name != "mamba":
        common.update(num_attention_heads=4, num_key_value_heads=2)
    model = getattr(transformers, model_name)(getattr(transformers, config_name)(**common, **extra))
    ref = copy.deepcopy(model)
    ids = torch.randint(0, 64, (2, 24))

    backend = SparsaBackend({"target": "cpu"})
    grads, want_grads = _trains_as_eager(model, ref, backend, ids, _train_lm, loss_atol=1e-5)
    assert grads.keys() == want_grads.keys()
    assert not backend.fallbacks, dict(backend.fallbacks)
    names = {op.NAME for part in backend.partitions for op in part.func.walk()}
    if name == "mamba":  # its associative scan folded: a scan forward, the transposed scan backward, per layer
        assert backend.stats["parallel scans recognized"] == 2
        scans = [op.transpose for part in backend.partitions for op in part.func.walk() if op.NAME == "scan.scan"]
        assert sorted(scans) == [False, False, True, True]
    if name != "mamba":
        assert {"attn.attention_lse", "attn.attention_grad"} <= names
        assert {"moe.dispatch", "moe.grouped_weight_grad"} <= set(_block_ops(backend))
        assert backend.stats["moe blocks recognized for training"] == 2  # one per layer
        assert backend.stats["top-k backward scatters as adds"] == 2
        # two steps of two layers, every backward from its forward's residuals
        assert dict(backend.moe_blocks.stats) == {"moe backward from saved residuals": 4}


def _block_ops(backend, half: str = "") -> list[str]:
    """The ops of the folded MoE blocks' compiled reverse mode: `half` "fwd" or "bwd", or both."""
    return [op.NAME for model in backend.moe_blocks.models.values() for f in model._backward().module.funcs[1:]
            if f.sym_name.endswith(half) for op in f.walk()]


class ConvBlock(torch.nn.Module):
    """Mamba's pieces outside the scan: a causal depthwise conv1d (padding both sides, the tail cut), softplus,
    a strided slice, padding before and a negative pad (a crop), stack."""

    def __init__(self, channels: int = 6, taps: int = 4, bias: bool = True):
        super().__init__()
        self.conv = torch.nn.Conv1d(channels, channels, taps, groups=channels, padding=taps - 1, bias=bias)
        self.proj = torch.nn.Linear(channels, channels)

    def forward(self, x):  # x: [B, C, L]
        L = x.shape[-1]
        h = F.softplus(self.conv(x)[..., :L])
        every_other = h[:, :, 1::2]
        padded = F.pad(every_other, (2, -1))
        both = torch.stack([padded, padded * 2.0], dim=1).sum(1)
        return self.proj(both.transpose(1, 2))


@pytest.mark.parametrize("target", ["reference", "cpu"])
@pytest.mark.parametrize("bias", [True, False])  # without: convolution_backward's bias_sizes is [0]
def test_conv1d_softplus_strided_slices_and_stack_train_on_sparsas_rules(target: str, bias: bool) -> None:
    SparsaBackend = _backend_for(target)

    torch.manual_seed(0)
    model, x = ConvBlock(bias=bias), torch.randn(2, 6, 11)
    ref = copy.deepcopy(model)
    backend = SparsaBackend({"target": target, "partitions": "all"})
    _trains_as_eager(model, ref, backend, x, grad_atol=1e-6)
    assert not backend.fallbacks, dict(backend.fallbacks)


def _mixtral_block(experts: str = "grouped_mm", sentinel_guards: bool = False, hidden: int = 32,
                   inner: int = 48) -> tuple:
    """A small transformers Mixtral block in one expert form (weights drawn from N(0, 0.2)), and a copy."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    torch.manual_seed(0)
    config = transformers.MixtralConfig(hidden_size=hidden, intermediate_size=inner, num_local_experts=4,
                                        num_experts_per_tok=2)
    config._experts_implementation = experts
    block = MixtralSparseMoeBlock(config)
    block.experts._is_expert_parallel = sentinel_guards
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return block, copy.deepcopy(block)


@pytest.mark.parametrize("target", ["reference", "cpu", "triton"])
@pytest.mark.parametrize(("experts", "sentinel_guards"), [("grouped_mm", False), ("batched_mm", False),
                                                         ("grouped_mm", True)])
def test_moe_blocks_train_on_sparsas_backward(target: str, experts: str, sentinel_guards: bool) -> None:
    """A transformers Mixtral block in each compilable expert form, trained under backend=sparsa: the block is
    folded before AOTAutograd traces it, so the forward graph holds sparsa::moe_swiglu and the backward graph its
    backward, both run as the experts compiled by Sparsa (the forward keeping its residuals for the backward:
    grouped GEMMs over the dispatch's segments); the router's backward (softmax, top-k's scatter) is imported.
    Nothing falls back; losses and gradients equal eager's. (triton: its interpreter here, on CPU tensors.)"""
    if target == "cpu":
        pytest.importorskip("torch_mlir")
    if target == "triton":
        pytest.importorskip("triton")
    from sparsa.runtime.torch_backend import SparsaBackend

    block, ref = _mixtral_block(experts, sentinel_guards)
    x = torch.randn(2, 9, 32)
    backend = SparsaBackend({"target": target})
    _trains_as_eager(block, ref, backend, x)
    assert not backend.fallbacks, dict(backend.fallbacks)
    assert backend.stats["moe blocks recognized for training"] == 1
    assert backend.stats["moe blocks compiled for training"] == 2  # its forward and its backward
    names = {op.NAME for part in backend.partitions for op in part.func.walk()}
    assert "tensor.scatter_add" in names
    assert {"moe.dispatch", "moe.grouped_weight_grad"} <= set(_block_ops(backend))
    # the backward reads the forward's dispatch and SwiGLU products (saved residuals): no dispatch, no forward GEMM
    # again; the gates' gradient comes from dY's rows through W2^T, the GEMM dH needs anyway, and x needs no
    # gradient here, so no dX GEMMs: one grouped matmul and the three weight gradients
    backward = _block_ops(backend, "bwd")
    assert backward.count("moe.grouped_matmul") == 1 and backward.count("moe.grouped_weight_grad") == 3, backward
    assert "moe.dispatch" not in backward and "moe.grouped_matmul_combine" not in backward, backward
    assert dict(backend.moe_blocks.stats) == {"moe backward from saved residuals": 2}
    assert not backend.moe_blocks.pullbacks  # each step's freed with its key after the backward
    if target == "cpu" and experts == "grouped_mm":  # gate_up's halves packed through the slices, not copied out
        forward = next(iter(backend.moe_blocks.models.values()))._backward().forward
        kernels = [(launch.kernel.name, launch.kernel.op.NAME) for launch in forward.host.launches]
        assert any("pack_panels" in k for k, _ in kernels), kernels
        assert not [k for k, op in kernels if op in ("tensor.slice", "tensor.transpose")], kernels


@pytest.mark.parametrize("native", ["1", "0"])
@pytest.mark.parametrize(("hidden", "inner"), [(32, 48), (64, 128)])
def test_gate_up_weight_gradients_are_written_in_place(monkeypatch, native: str, hidden: int, inner: int) -> None:
    """The folded block's gate_up gradient is its gate and up halves' weight gradients joined: one kernel writes
    each half into its rows of the [E, 2F, D] result (no concat after them), on the native host and on the Python
    host, in the packed path (64 x 128: whole register tiles and panels) and the other: the gradients eager's."""
    pytest.importorskip("torch_mlir")
    from sparsa.runtime.torch_backend import SparsaBackend

    monkeypatch.setenv("SPARSA_NATIVE_HOST", native)
    block, ref = _mixtral_block(hidden=hidden, inner=inner)
    backend = SparsaBackend({"target": "cpu"})
    _trains_as_eager(block, ref, backend, torch.randn(2, 40, hidden))
    backward = next(iter(backend.moe_blocks.models.values()))._backward().native
    kernels = [k.name for k in backward.kernels.values()]
    assert any("joined_weight_grads" in k for k in kernels) and not any("concat" in k for k in kernels), kernels
    assert (backward.main is not None) == (native == "1")


@pytest.mark.parametrize("target", ["reference", "cpu"])
@pytest.mark.parametrize("form", ["relu2", "transposed", "interleaved", "interleaved+bias"])
def test_moe_experts_of_other_activations_train_on_sparsas_backward(target: str, form: str) -> None:
    """transformers' grouped_mm experts of another activation than SwiGLU (NemotronH's relu^2 on [E, out, in]
    weights, Aria's GELU gate on [E, in, out], GPT-OSS's interleaved gate/up with clamps, and its biases), after
    a projection
    (so x wants a gradient too): folded into sparsa::moe_experts before AOTAutograd, both halves run as the experts
    compiled by Sparsa (the weights as stored, the activation differentiated by its ops' rules, the dispatch and
    products saved for the backward). Nothing falls back; losses and gradients equal eager's."""
    if target == "cpu":
        pytest.importorskip("torch_mlir")
    pytest.importorskip("transformers")
    from transformers_experts import experts_block

    from sparsa.runtime.torch_backend import SparsaBackend

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 32), experts_block(form)).train()
    ref = copy.deepcopy(model)
    backend = SparsaBackend({"target": target})
    _trains_as_eager(model, ref, backend, torch.randn(19, 32))
    assert not backend.fallbacks, dict(backend.fallbacks)
    assert backend.stats["moe blocks recognized for training"] == 1
    assert backend.stats["moe blocks compiled for training"] == 2
    assert {"moe.dispatch", "moe.grouped_matmul_combine", "moe.grouped_weight_grad"} <= set(_block_ops(backend))
    backward = _block_ops(backend, "bwd")
    assert "moe.dispatch" not in backward and backward.count("moe.grouped_weight_grad") >= 2, backward
    assert dict(backend.moe_blocks.stats) == {"moe backward from saved residuals": 2}


@pytest.mark.parametrize("form", ["interleaved", "interleaved+bias", "interleaved+learned"])
def test_moe_experts_reading_float_attributes_train_under_dynamic_shapes(form: str) -> None:
    """GPT-OSS's activation reads its module's alpha and limit, which Dynamo passes as 0-d tensors under
    dynamic=True: they become inputs of sparsa::moe_experts (no gradient to them), so the block still folds and
    trains as eager at each length. An alpha that is a parameter wants a gradient: that block is not folded, and
    PyTorch's autograd gives its gradient."""
    pytest.importorskip("transformers")
    from transformers_experts import experts_block

    from sparsa.runtime.torch_backend import SparsaBackend

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 32), experts_block(form)).train()
    ref = copy.deepcopy(model)
    backend = SparsaBackend({"target": "cpu"})
    compiled = torch.compile(model, backend=backend, dynamic=True)
    for tokens in (19, 26):
        x = torch.randn(tokens, 32)
        for m, f in ((model, compiled), (ref, ref)):
            m.zero_grad()
            f(x).square().mean().backward()
        for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)
    folded = backend.stats["moe blocks recognized for training"] >= 1
    assert folded == (form != "interleaved+learned") and bool(backend.fallbacks) == (not folded)


class SinkAttention(torch.nn.Module):
    """GPT-OSS's attention sinks: a learned logit per head joins each row's scores, the row's max (keepdim) is
    subtracted before the softmax, and the sink's column is dropped after it."""

    def __init__(self, dim: int = 16, heads: int = 2):
        super().__init__()
        self.qkv, self.heads = torch.nn.Linear(dim, 3 * dim), heads
        self.sinks = torch.nn.Parameter(torch.randn(heads))

    def forward(self, x):
        B, S, D = x.shape
        q, k, v = self.qkv(x).view(B, S, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        logits = q @ k.transpose(-1, -2)
        sinks = self.sinks.reshape(1, -1, 1, 1).expand(B, -1, S, 1)
        combined = torch.cat([logits, sinks], dim=-1)
        combined = combined - combined.max(dim=-1, keepdim=True).values
        probs = torch.softmax(combined, dim=-1)[..., :-1]
        return (probs @ v).transpose(1, 2).reshape(B, S, D)


def test_a_max_with_keepdim_trains_on_an_imported_scatter() -> None:
    """max(dim, keepdim=True)'s backward scatters into zeros at its indices, one per row, which cannot repeat: a
    scatter_add, imported (it fell back to PyTorch in GPT-OSS's attention sinks)."""
    from sparsa.runtime.torch_backend import SparsaBackend

    torch.manual_seed(0)
    model = SinkAttention()
    backend = SparsaBackend({"target": "reference"})
    _trains_as_eager(model, copy.deepcopy(model), backend, torch.randn(2, 7, 16))
    assert not backend.fallbacks, dict(backend.fallbacks)
    assert backend.stats["top-k backward scatters as adds"] == 1


class ChunkWrites(torch.nn.Module):
    """Qwen3-Next's gated delta rule fills its output a chunk at a time (`out[:, :, i] = ...` into a zeros_like;
    here also broadcast, into float64), before a MoE block."""

    def __init__(self, block):
        super().__init__()
        self.block, self.proj = block, torch.nn.Linear(32, 32)

    def forward(self, x):
        x = self.proj(x)
        out = torch.zeros_like(x)
        for i in range(x.shape[1]):
            out[:, i] = torch.tanh(x[:, i]) * 2
        wide = torch.zeros_like(x, dtype=torch.float64)
        wide[:, :, :8] = x[:, :, :1]  # broadcast, into another dtype
        return self.block(out + wide.float())


def test_slice_assignments_beside_a_folded_moe_block_train() -> None:
    """Folding a training graph's MoE block traces it functionalized, where a slice assignment is aten.copy, which
    autograd has no formula for (training failed in AOTAutograd): it is written as its value, and trains as eager."""
    from sparsa.runtime.torch_backend import SparsaBackend

    model = ChunkWrites(_mixtral_block()[0])
    backend = SparsaBackend({"target": "reference"})
    _trains_as_eager(model, copy.deepcopy(model), backend, torch.randn(2, 5, 32))
    assert backend.stats["moe blocks recognized for training"] == 1


class ComplexRotary(torch.nn.Module):
    """q and k rotated in complex numbers (DeepSeek-V2's, Llama 4's rotary embedding): the backward conjugates the
    rotations and takes the complex products' real views back."""

    def __init__(self):
        super().__init__()
        self.q, self.k = torch.nn.Linear(16, 16), torch.nn.Linear(16, 16)

    def forward(self, x):
        angles = torch.arange(x.shape[0])[:, None].float() * torch.arange(8).float() * 0.1
        cis = torch.polar(torch.ones_like(angles), angles)

        def rotate(t):
            return torch.view_as_real(torch.view_as_complex(t.reshape(t.shape[0], 8, 2)) * cis).flatten(1)

        return rotate(self.q(x)) @ rotate(self.k(x)).t()


@pytest.mark.parametrize("target", ["reference", "cpu"])
def test_complex_rotary_embeddings_train(target: str) -> None:
    SparsaBackend = _backend_for(target)
    torch.manual_seed(0)
    model = ComplexRotary()
    backend = SparsaBackend({"target": target})
    _trains_as_eager(model, copy.deepcopy(model), backend, torch.randn(6, 16))
    assert not backend.fallbacks, dict(backend.fallbacks)
    assert backend.stats["partitions compiled"] >= 2  # the forward's and the backward's


class Shifted(torch.nn.Module):
    """A language model's shift by one (`h[:, :-1]` against `x[:, 1:]`), a slice from an offset and the last rows (a
    sliding window's `h[:, -3:]`, and one longer than the sequence): at a new length their backward puts dY back
    along a symbolic dim (the last rows from `L-3`, or from 0), and sizes come out written in other orders."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, x):
        h = self.proj(x)
        loss = torch.nn.functional.cross_entropy(h[:, :-1].reshape(-1, 8), x[:, 1:].argmax(-1).reshape(-1))
        return (h[:, :-1] * x[:, 1:]).sum() + h[:, 2:].square().mean() + loss + h[:, -3:].exp().sum() + \
            h[:, -100:].tanh().mean() + h[:, -x.shape[1]:].sin().sum()  # (a window longer than the sequence, and
        # one from -L: all of it)


def _trains_as_eager_at(lengths: tuple, model: torch.nn.Module, backend: object, atol: float = 1e-5) -> None:
    """model compiled with dynamic=True, called on x of [2, length, 8] at each length: the gradients of x and of
    every parameter equal eager's."""
    ref = copy.deepcopy(model)
    compiled = torch.compile(model, backend=backend, dynamic=True)
    for length in lengths:
        x = torch.randn(2, length, 8, requires_grad=True)
        x_ref = x.detach().clone().requires_grad_(True)
        for m, f, inp in ((model, compiled, x), (ref, ref, x_ref)):
            m.zero_grad()
            f(inp).backward()
        torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=atol)
        for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=atol, msg=name)


def _trains_whole_at(target: str, lengths: tuple, make: type, atol: float = 1e-5, **options: str) -> None:
    """make() trained on `target` as `_trains_as_eager_at` does: one graph serves every length, and nothing of it
    is left to PyTorch."""
    SparsaBackend = _backend_for(target)
    torch.manual_seed(0)
    backend = SparsaBackend({"target": target, **options})
    _trains_as_eager_at(lengths, make(), backend, atol=atol)
    assert not backend.fallbacks, dict(backend.fallbacks)
    assert backend.stats["graphs"] == 1


def test_shifted_slices_train_at_new_lengths_under_dynamic_shapes() -> None:
    _trains_whole_at("reference", (7, 11), Shifted, atol=1e-6)


class EveryOther(torch.nn.Module):
    """A parallel scan's steps (Mamba's pscan): every other row from 0 or 1, to the end or short of it, of an odd
    or even length, and the last rows, whose backward puts dY back with a step along a symbolic dim; and a column
    selected (its backward: zeros around it, of symbolic rows)."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, x):
        h = self.proj(x)
        return ((h[:, 0::2].exp().sum() + h[:, 1::2].square().sum()) * h[:, 0:-1:2].mean() + h[:, 1:-2:3].sum()
                + h[:, -3:].sigmoid().sum() + h[..., 2].exp().sum())


@pytest.mark.parametrize("target", ["reference", "cpu"])
def test_strided_slices_train_at_new_lengths_under_dynamic_shapes(target: str) -> None:
    _trains_whole_at(target, (7, 10, 13), EveryOther)


class OneChunk(torch.nn.Module):
    """Mamba2's chunked form at lengths within one chunk of 16: padded by (16 - L % 16) % 16 rows (its backward
    crops them off), viewed as chunks, a segment sum over the chunks' count plus one, which broadcasts against a
    pair (as HF Mamba2's heads do: Dynamo's guards then fix the count to 1), cut back to L rows and reversed along
    them (a flip along a symbolic dim)."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)
        self.pair = torch.nn.Parameter(torch.randn(2, 1))

    def forward(self, x):
        B, L, D = x.shape
        c = F.pad(self.proj(x), (0, 0, 0, (16 - L % 16) % 16)).view(B, -1, 16, D)
        seg = F.pad(c[:, :, -1], (0, 0, 1, 0)).cumsum(1) * self.pair  # [B, chunks + 1, D]
        mask = torch.tril(torch.ones(seg.shape[1], seg.shape[1], dtype=torch.bool))
        states = (seg[:, :, None] - seg[:, None, :]).masked_fill(~mask[None, :, :, None], 0.0).exp().sum(2)[:, 1:]
        y = (c * states[:, :, None]).reshape(B, -1, D)[:, :L]
        return y.flip(1).cumsum(1).sin().sum() + y.square().mean()


@pytest.mark.parametrize("target", ["reference", "cpu"])
def test_padding_to_whole_chunks_trains_under_dynamic_shapes(target: str) -> None:
    """A padding and a crop by `(16 - L % 16) % 16` rows, sizes known only at run time (they were left to PyTorch,
    as were flips along a symbolic dim): imported where the shape environment proves their sign, and the whole
    graph trains as eager at three lengths, nothing left to PyTorch."""
    _trains_whole_at(target, (5, 9, 13), OneChunk, atol=1e-4)


class KeptLogits(torch.nn.Module):
    """A table's last L rows (MPT's ALiBi bias, `alibi[:, :, -L:]` of its 2048 positions; MiniMax's decay rates), and
    HF's logits `hidden[:, -logits_to_keep:]` with logits_to_keep 0 (every position: under dynamic=True Dynamo
    makes the 0 a name, s, which a guard of the logits' view fixes; the slice's rows are `s + L`); and a repeat by
    the batch size (Bloom's ALiBi slopes)."""

    def __init__(self):
        super().__init__()
        self.proj, self.head = torch.nn.Linear(8, 8), torch.nn.Linear(8, 4)
        self.table, self.slopes = torch.nn.Parameter(torch.randn(64, 8)), torch.nn.Parameter(torch.randn(1, 1, 8))

    def forward(self, x, logits_to_keep=0):
        h = torch.tanh(self.proj(x)) * self.table[-x.shape[1]:] + self.slopes.repeat(x.shape[0], 1, 1)
        return self.head(h[:, -logits_to_keep:, :]).view(-1, 4).square().mean()


@pytest.mark.parametrize("target", ["reference", "cpu"])
def test_slices_from_run_time_starts_train_under_dynamic_shapes(target: str) -> None:
    """Slices that start at a size known at run time (64 - L; -s, where a guard fixes s to 0) were left to PyTorch
    with the views after them ("slice with symbolic start": 2 or 3 ops in GPT-J, CodeGen, Falcon, Bloom, MPT,
    MiniMax, Mamba2). The last L rows are a slice from 64 - L (a start that is a size); the guard's 0 makes the
    logits' rows L. A repeat by a size was left too (Bloom). Nothing is left to PyTorch and the gradients equal
    eager's at three lengths."""
    _trains_whole_at(target, (5, 9, 13), KeptLogits)


class Ends(torch.nn.Module):
    """The first row (BigBird's pooler) and the last of a sequence of symbolic length: select_backward to sizes
    with a symbolic dim."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, x):
        h = torch.tanh(self.proj(x))
        return h[:, 0].sum() + h[:, -1].square().sum() + h[:, -2].exp().sum()


@pytest.mark.parametrize("target", ["reference", "cpu"])
def test_rows_selected_from_a_symbolic_length_train(target: str) -> None:
    """select_backward along a symbolic dim was left to PyTorch ("int %= str"): now zeros before and after the row,
    as many as the length leaves; gradients equal eager's at three lengths."""
    _trains_whole_at(target, (5, 9, 13), Ends, partitions="all")


def _segments(x, counts):
    """x split into runs of `counts` rows (JetMoe's experts' segments, their counts a list of ints) and what
    follows the first run: slices whose starts are sizes known at run time."""
    pieces = torch.split(x, counts)
    return torch.cat([p.sum(0, keepdim=True) * (i + 1) for i, p in enumerate(pieces)]) + x[counts[0]:].sum()


@pytest.mark.parametrize("target", ["reference", "cpu"])
def test_splits_by_sizes_known_at_run_time_train(target: str) -> None:
    """A split by counts Dynamo makes symbolic (dynamic=True) was a `tensor.split` of symbolic sizes, which the
    verifier refused (its whole partition stayed in PyTorch): now slices from the counts' running sums, and the
    values and gradients equal eager's for every set of counts, an empty run among them."""
    SparsaBackend = _backend_for(target)
    backend = SparsaBackend({"target": target})
    compiled = torch.compile(_segments, backend=backend, dynamic=True)
    for counts in ([3, 2, 4], [1, 5, 3], [4, 0, 2]):
        x = torch.randn(sum(counts), 6, requires_grad=True)
        x_ref = x.detach().clone().requires_grad_(True)
        got, want = compiled(x, counts), _segments(x_ref, counts)
        torch.testing.assert_close(got, want)
        got.square().sum().backward()
        want.square().sum().backward()
        torch.testing.assert_close(x.grad, x_ref.grad)
    assert not backend.fallbacks, dict(backend.fallbacks)


def test_nemotron_h_trains_whole_under_dynamic_shapes() -> None:
    """transformers' NemotronH (Mamba2 layers, a relu^2 MoE, attention) trained under dynamic=True at two lengths:
    its chunked scan pads to whole chunks of 128 by a run-time amount, and Dynamo's guards fix the chunks' count
    to 1 (its heads, 2 of them, broadcast against the count plus one). Sizes made of guard-fixed ones (`2*(n//128)`
    chunk pairs, the padding `128 - L`) are written as what the guards make them, so that they meet the sizes they
    equal (they had not: 18 ops were left to PyTorch); the gradients equal eager's."""
    transformers = pytest.importorskip("transformers")
    from sparsa.runtime.torch_backend import SparsaBackend

    torch.manual_seed(0)
    config = transformers.NemotronHConfig(
        vocab_size=64, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=48,
        mamba_num_heads=2, mamba_head_dim=8, n_groups=1, ssm_state_size=8, chunk_size=32, n_routed_experts=4,
        num_experts_per_tok=2, moe_intermediate_size=16, moe_shared_expert_intermediate_size=16)
    model = transformers.NemotronHForCausalLM(config)
    ref = copy.deepcopy(model)
    backend = SparsaBackend({"target": "reference"})
    compiled = torch.compile(model, backend=backend, dynamic=True)
    for length in (12, 19):
        ids = torch.randint(0, 64, (2, length))
        for m, f in ((model, compiled), (ref, ref)):
            m.zero_grad()
            f(input_ids=ids, labels=ids).loss.backward()
        for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)
    assert not backend.fallbacks, dict(backend.fallbacks)


class Picked(torch.nn.Module):
    """Log-probabilities gathered at the labels (few places, compared), token types gathered from a [1, 512] buffer
    at the first L positions (BERT's: L places, symbolic, along 512) and 300 places along 300 (too many to compare):
    the last two are addressed, as `tensor.gather`s; their backward is a scatter-add."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 300)
        self.register_buffer("types", torch.arange(512).remainder(3).unsqueeze(0))

    def forward(self, x, labels):
        B, L, _ = x.shape
        logp = self.proj(x).log_softmax(-1)
        picked = logp.gather(-1, labels[..., None]).squeeze(-1)
        types = self.types.expand(B, 512).gather(1, torch.arange(L).expand(B, L))
        wide = logp.gather(-1, labels[..., None].expand(B, L, 300).flip(-1).remainder(300))
        return picked * (types + 1) + wide.mean(-1)


@pytest.mark.parametrize("target", ["reference", "cpu"])
def test_gathers_along_long_or_symbolic_dims_are_addressed(target: str) -> None:
    """A gather with too many places to compare with an iota, or along a symbolic dim, was left to PyTorch
    ("compared, not addressed"; BERT's token types under dynamic=True): it imports as a `tensor.gather`, and the
    results and gradients equal eager's at two lengths."""
    SparsaBackend = _backend_for(target)
    torch.manual_seed(0)
    model = Picked()
    ref = copy.deepcopy(model)
    backend = SparsaBackend({"target": target})
    compiled = torch.compile(model, backend=backend, dynamic=True)
    for length in (5, 9):
        x, labels = torch.randn(2, length, 8), torch.randint(0, 300, (2, length))
        got, want = compiled(x, labels), ref(x, labels)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        got.sum().backward()
        want.sum().backward()
        for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)
    assert not backend.fallbacks, dict(backend.fallbacks)
    ops = [op.NAME for part in backend.partitions for op in part.func.walk()]
    assert ops.count("tensor.gather") == 2 and "tensor.scatter_add" in ops


class VmapBmm(torch.nn.Module):
    """A bmm (so the MoE fold traces the graph) beside a torch.vmap, which Dynamo inlines as vmap's levels (as in
    torch's associative scan at a symbolic length: Jamba's Mamba layers)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(8, 8))

    def forward(self, x):
        h = torch.bmm(x, self.w.expand(x.shape[0], 8, 8))
        return torch.vmap(lambda r: r.sin() * r.cos())(h).sum()


def test_a_graph_with_vmap_inside_trains_unfolded() -> None:
    """Tracing such a graph for the MoE fold failed an internal assert of functorch, which left its interpreter
    stack such that AOTAutograd failed next (BackendCompilerFailed: "batched == nullptr"): it is not traced for
    the fold, says why, and trains as eager."""
    from sparsa.runtime.torch_backend import SparsaBackend

    torch.manual_seed(0)
    backend = SparsaBackend({"target": "reference"})
    _trains_as_eager_at((5, 9), VmapBmm(), backend)
    assert backend.stats["training graphs not folded: a functorch transform (_vmap_increment_nesting) in the graph"]


def test_a_scatter_other_than_top_ks_backward_stays_in_pytorch() -> None:
    """scatter writes over its base (the last write winning where indices repeat): only a top-k's backward (onto
    zeros, at the top-k's indices) is imported, as a scatter_add; any other runs in PyTorch, said why, and right."""
    from sparsa.runtime.torch_backend import SparsaBackend

    def f(x, idx, src):
        return (x @ x.T).scatter(-1, idx, src)

    x, src = torch.randn(4, 4), torch.randn(4, 2)
    idx = torch.tensor([[0, 0], [1, 3], [2, 2], [3, 0]])
    backend = SparsaBackend({"target": "reference"})
    got = torch.compile(f, backend=backend)(x, idx, src)
    torch.testing.assert_close(got, f(x, idx, src))
    assert set(backend.fallbacks) == {"aten.scatter.src"}


def test_moe_block_trains_at_changing_sizes() -> None:
    """Called at three token counts, Dynamo compiles the block again with a symbolic size: the fold keeps it
    symbolic (traced on AOTAutograd's own fake tensors), the partitions bind sizes given as expressions (2*s
    rows), nothing falls back, and every output and gradient equals eager's."""
    pytest.importorskip("torch_mlir")
    from sparsa.runtime.torch_backend import SparsaBackend

    block, ref = _mixtral_block()
    backend = SparsaBackend({"target": "cpu"})
    compiled = torch.compile(block, backend=backend)
    for tokens in (9, 13, 17):
        x = torch.randn(2, tokens, 32, requires_grad=True)
        x_ref = x.detach().clone().requires_grad_(True)
        for f, inp in ((compiled, x), (ref, x_ref)):
            y = f(inp)
            (y[0] if isinstance(y, tuple) else y).square().sum().backward()
        torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-5)
        for (n, p), q in zip(block.named_parameters(), ref.parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=n)
            p.grad, q.grad = None, None
    assert backend.stats["graphs"] == 2 and backend.stats["moe blocks recognized for training"] == 2
    assert not backend.fallbacks, dict(backend.fallbacks)


def test_a_training_graph_the_fold_cannot_trace_is_compiled_unfolded(monkeypatch) -> None:
    """Where Dynamo's graph cannot be traced for the fold, it is compiled as it came: right gradients, the reason in
    the backend's stats, and the block's ops among the fallbacks (nothing silent)."""
    from sparsa.runtime.torch_backend import SparsaBackend

    def cannot(*args, **kwargs):
        raise RuntimeError("cannot trace this")

    block, ref = _mixtral_block()
    monkeypatch.setattr(torch.func, "functionalize", cannot)  # the fold's tracing step (AOTAutograd has its own)
    backend = SparsaBackend({"target": "reference"})
    x = torch.randn(2, 9, 32)
    _, grads = _train(block, backend, x, steps=1)
    _, want = _train(ref, None, x, steps=1)
    for n, g in want.items():
        torch.testing.assert_close(grads[n], g, rtol=1e-4, atol=1e-5, msg=n)
    assert backend.stats["training graphs not folded: RuntimeError: cannot trace this"] == 1
    assert "transformers.grouped_mm_fallback.default" in backend.fallbacks


@pytest.mark.parametrize("op", ["moe_swiglu", "moe_experts"])
def test_a_folded_block_sparsa_cannot_compile_runs_its_pytorch_definition(monkeypatch, op: str) -> None:
    """A folded block whose experts Sparsa cannot compile keeps the custom ops, whose PyTorch definitions (a loop
    over experts; the backward written out for SwiGLU, torch.func's reverse mode of the loop for other
    activations) train it as eager does; both calls are fallbacks, with the reason."""
    from sparsa.ir.diagnostics import SparsaError
    from sparsa.runtime.torch_backend import SparsaBackend
    from sparsa.runtime.torch_moe import FoldedBlocks

    def cannot(*args, **kwargs):
        raise SparsaError("no experts today")

    monkeypatch.setattr(FoldedBlocks, "model", cannot)
    if op == "moe_swiglu":
        block, ref = _mixtral_block()
        x = torch.randn(2, 9, 32)
    else:
        pytest.importorskip("transformers")
        from transformers_experts import experts_block

        block = torch.nn.Sequential(torch.nn.Linear(32, 32), experts_block("interleaved+bias")).train()
        ref, x = copy.deepcopy(block), torch.randn(19, 32)
    backend = SparsaBackend({"target": "reference"})
    _trains_as_eager(block, ref, backend, x)
    assert backend.fallbacks == {f"sparsa.{op}.default": 1, f"sparsa.{op}_backward.default": 1}
    assert backend.stats["moe blocks compiled for training"] == 0
    import sparsa

    assert "the folded MoE block did not compile: no experts today" in str(sparsa.report())


@pytest.mark.parametrize("target", ["reference", "cpu"])
@pytest.mark.parametrize("op", ["moe_swiglu", "moe_experts"])
def test_folded_block_backward_from_residuals_or_the_forward_again(target: str, op: str) -> None:
    """The compiled block's forward keeps its pullback under the key it returns, for as long as the key lives; the
    backward reads it, or runs the forward again for a key it has nothing under (or for a gradient the forward was
    told was not needed). Every gradient equals the op's PyTorch definition's (moe_experts: relu^2 experts, the
    first weight stored transposed, the second not, a bias on the first)."""
    if target == "cpu":
        pytest.importorskip("torch_mlir")
    import gc

    from torch.fx.experimental.proxy_tensor import make_fx

    from sparsa.frontend.torch_moe import activation_name, new_key
    from sparsa.runtime.torch_moe import FoldedBlocks

    torch.manual_seed(0)
    T, D, Fd, E = 7, 16, 24, 4
    x, w = torch.randn(T, D), torch.rand(T, 2)
    idx = torch.stack([torch.randperm(E)[:2] for _ in range(T)])
    if op == "moe_swiglu":
        w1, w2, rest = torch.randn(E, 2 * Fd, D) * 0.3, torch.randn(E, D, Fd) * 0.3, ()
    else:
        relu2 = make_fx(lambda h0: torch.relu(h0) ** 2)(torch.randn(2, Fd))
        w1, w2 = torch.randn(E, Fd, D) * 0.3, torch.randn(E, Fd, D) * 0.3
        rest = ([torch.randn(E, Fd)], activation_name(relu2), [0, Fd, 1], [1, 0], [1, 0])
    ops = torch.ops.sparsa
    dy = torch.randn(T, D)
    want = getattr(ops, f"{op}_backward")(dy, new_key(), x, idx, w, w1, w2, *rest, [])
    blocks = FoldedBlocks(target)
    y, key = blocks.forward(x, idx, w, w1, w2, *rest, [0])  # x given no gradient: its GEMMs left out
    torch.testing.assert_close(y, getattr(ops, op)(x, idx, w, w1, w2, *rest, [])[0], rtol=1e-5, atol=1e-5)
    assert list(blocks.pullbacks) == [int(key)]
    for wanted, how in (({1, 2, 3}, "moe backward from saved residuals"),
                        ({0, 1, 2, 3}, "moe backward with the forward run again")):
        blocks.stats.clear()
        got = blocks.backward(dy, key, x, idx, w, w1, w2, *rest, [0], wanted=frozenset(wanted))
        assert dict(blocks.stats) == {how: 1}
        for i, (g, ref) in enumerate(zip(got, want, strict=True)):
            if i == 4:  # the biases', always
                torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-5, msg="biases")
            elif i in wanted:
                torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-5, msg=str(i))
            else:
                assert g is None
    blocks.stats.clear()
    blocks.backward(dy, new_key(), x, idx, w, w1, w2, *rest, [0], wanted=frozenset({1, 2, 3}))
    assert dict(blocks.stats) == {"moe backward with the forward run again": 1}
    del key
    gc.collect()
    assert not blocks.pullbacks  # freed with the key
