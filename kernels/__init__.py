"""Triton kernels of fastdiag (installed as ``fastdiag.kernels``).

Import the kernel modules directly (``fastdiag.kernels.dist_stats``); importing this package
does not import triton, so ``fastdiag`` stays importable without it.
"""
