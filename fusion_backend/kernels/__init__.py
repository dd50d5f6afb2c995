"""Triton kernels and their launchers.

Nothing in this package knows about FX graphs, rules or custom ops: a kernel module takes tensors
and launch parameters and returns tensors. The ops layer (`fusion_backend.ops`) wraps them.
"""
