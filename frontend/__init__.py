"""The `.sp` language frontend: grammar, checking, lowering to IR."""
