"""Triton kernels, each beside its PyTorch reference (filled in by the Triton backend)."""
