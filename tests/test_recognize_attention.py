"""Hand-written attention and the `attention` construct end in the same op with the same block map."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

import sparsa

EXAMPLES = Path(__file__).parent.parent / "examples"
CONSTRUCT = """
mask causal(q, k) = k <= q
model HandAttention(q: f32[B, H, S, 64], k: f32[B, H, S, 64], v: f32[B, H, S, 64]) -> f32[B, H, S, 64] {
    return attention(q, k, v, mask=causal)
}
"""


def body(ir: str) -> str:
    """The function body without locations: what the kernel is made from."""
    return re.sub(r' loc\("[^"]*":\d+:\d+\)', "", ir)


def test_unfused_example_matches_the_attention_construct():
    hand = sparsa.compile(str(EXAMPLES / "unfused_attention.sp"), target="reference")
    construct = sparsa.compile(CONSTRUCT, target="reference")
    assert body(hand.ir()) == body(construct.ir())
    assert "tensor.softmax" not in hand.ir() and "attn.block_map" in hand.ir()
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 2, 70, 64)).astype(np.float32) for _ in range(3))
    np.testing.assert_allclose(hand(q, k, v), construct(q, k, v), rtol=1e-6)


def test_static_sizes_give_the_same_precomputed_block_map():
    hand_src = (EXAMPLES / "unfused_attention.sp").read_text().replace("[B, H, S, 64]", "[1, 2, 256, 64]")
    hand_src = hand_src.replace("iota(S)", "iota(256)")
    hand = sparsa.compile(hand_src, target="reference")
    construct = sparsa.compile(CONSTRUCT.replace("[B, H, S, 64]", "[1, 2, 256, 64]"), target="reference")
    maps = [re.search(r'map = "([^"]*)"', m.ir()).group(1) for m in (hand, construct)]
    assert maps[0] == maps[1] == "1x1x4x4:P1E3;F1P1E2;F2P1E1;F3P1"
