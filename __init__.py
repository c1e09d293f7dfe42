"""Sparsa: a compiler for sparse neural networks (MoE, block-sparse attention, scans, sparse weights)."""

__version__ = "0.1.0"
