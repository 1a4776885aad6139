"""Atomic file writes, now in `mllm.io` (the bottom layer's file module); kept so that existing imports work."""

from mllm.io import write_json_atomic, write_text_atomic

__all__ = ["write_json_atomic", "write_text_atomic"]
