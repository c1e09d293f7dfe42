"""Backends: each turns verified IR into something that runs (reference interpreter, cpu, triton)."""
