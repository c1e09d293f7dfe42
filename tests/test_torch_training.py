"""torch.compile training with Sparsa's derivatives: masked SDPA's backward graph imports as attention's own rule
(the dQ and dK/dV ops over the block map), nothing of the forward or the backward falls back, and every gradient
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


@pytest.mark.parametrize("target", ["reference", "cpu"])
def test_sliding_window_sdpa_trains_on_sparsas_backward(target: str) -> None:
    """Two optimizer steps under backend=sparsa equal eager's; the backward graph holds attention's dQ and dK/dV
    ops reading a block map (the mask is made again from positions in the backward graph, not saved), and
    no node of either graph is left to PyTorch."""
    if target == "cpu":
        pytest.importorskip("torch_mlir")
    from sparsa.runtime.torch_backend import SparsaBackend

    torch.manual_seed(0)
    model = SlidingAttention()
    ref = copy.deepcopy(model)
    x = torch.randn(2, 150, 64)
    backend = SparsaBackend({"target": target})
    losses, grads = _train(model, backend, x)
    want_losses, want_grads = _train(ref, None, x)
    assert not backend.fallbacks, dict(backend.fallbacks)
    assert backend.stats["saved tensors made again in the backward"] >= 1
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(want_losses), rtol=1e-5, atol=1e-6)
    for n, g in grads.items():
        torch.testing.assert_close(g, want_grads[n], rtol=1e-4, atol=1e-5, msg=n)
    ops = [op for part in backend.partitions for op in part.func.walk()]
    grad_ops = [op for op in ops if op.NAME in ("attn.attention_grad_q", "attn.attention_grad_kv")]
    assert len(grad_ops) == 2 and all(op.block_map is not None for op in grad_ops)
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
    assert {"attn.attention_lse", "attn.attention_grad_q", "attn.attention_grad_kv", "tensor.gather"} <= names
    for a, b in zip(qkv, ref, strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)
