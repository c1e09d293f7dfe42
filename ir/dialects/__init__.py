"""Dialects: importing this package registers every op."""

from sparsa.ir.dialects import (
    attn,
    attn_blocks,
    attn_grad,
    func,
    moe,
    moe_exchange,
    scan,
    scan_grad,
    sparse,
    tensor,
    tensor_grad,
    tensor_linalg,
    tensor_reduce,
    tensor_shape,
)

__all__ = [
    "attn", "attn_blocks", "attn_grad", "func", "moe", "moe_exchange", "scan", "scan_grad", "sparse", "tensor",
    "tensor_grad", "tensor_linalg", "tensor_reduce", "tensor_shape",
]
