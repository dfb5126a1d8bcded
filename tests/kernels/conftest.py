"""Kernel tests run on CUDA at full size when a GPU is present, else on the CPU under the Triton interpreter."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must be set before triton is imported
