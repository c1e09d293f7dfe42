"""The cpu backend (first slice): Sparsa IR lowered through upstream MLIR to LLVM and JIT-compiled."""
