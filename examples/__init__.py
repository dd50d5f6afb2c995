"""Runnable examples; `examples.truthgpt:build` is importable from the repository root."""
