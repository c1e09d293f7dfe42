"""The Triton backend (in progress): generated GPU kernels; see block-sparse attention in attention.py."""
