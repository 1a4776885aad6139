"""The frozen vision tower's outputs, kept per slice and reused when the same slice comes again.

When training leaves the tower frozen (LLaVA's and MiniCPM-V's usual SFT setting without `--tune-vision`), its output
for an image is the same every epoch; the demo's stages see each of their 6,000 images 5-20 times. `MLLMModel` asks
this cache instead of the tower when one is attached (`MLLMModel.attach_vision_cache`): slices seen before are
looked up by a digest of their pixels and grid, the others run through the tower together and are kept
until `max_bytes` is reached (then new slices are computed and not kept).

The rows are the tower's up to rounding, not always to the bit: on the 2-core Xeon of the demo runs (bfloat16
autocast) a slice run through the tower alone came out 1.5e-8 away from the same slice run in a batch of 16, while
batches of 2 to 15 gave the same bits (`benchmarks/vision_cache.py`). A step whose slices all hit, or all miss,
computes what it would without the cache (`tests/test_vision_cache.py` trains two epochs of four images so, SFT and
preference, to the same weights); a step with some of each runs the tower on the missing ones alone, in a smaller
batch. So a long run with the cache is a run at another rounding, as with another number of processes: the toy
demo's recipe with it (seed 0) followed the run without it to the bit until the second epoch of its `align` stage,
then drifted (docs/LOG.md, 2026-12-06, eleventh session).

Hand-written (a step whose slices are all cached ran 1.17x faster side by side on the demo's batches, README):
transformers has no cache of encoder outputs for training; a digest of the pixels is the key because the
collated batch carries no image ids (the same image under two paths, or two slices of one, is found either way).
"""

from __future__ import annotations

import hashlib

import torch

from mllm.model.vision import VisionTransformer


def slice_key(strip: torch.Tensor, size: torch.Tensor) -> bytes:
    """Digest of a slice's pixels [3, p, L*p] and its grid [2] (dtype and shape included)."""
    digest = hashlib.blake2b(digest_size=16)
    pixels = strip.detach().to("cpu").contiguous()
    digest.update(f"{pixels.dtype}{tuple(pixels.shape)}{size.tolist()}".encode())
    digest.update(pixels.view(torch.uint8).numpy())
    return digest.digest()


class VisionFeatureCache:
    """Tower outputs [L_i, D] by slice digest, up to `max_bytes` in all; `hits` and `misses` count slices."""

    def __init__(self, max_bytes: int):
        if max_bytes < 1:
            raise ValueError(f"a vision cache needs max_bytes >= 1, got {max_bytes}")
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._rows: dict[bytes, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self._rows)

    def encode(
        self,
        tower: VisionTransformer,
        strips: list[torch.Tensor],
        tgt_sizes: torch.Tensor,
        attn_implementation: str | None,
        chunk_size: int | None,
    ) -> torch.Tensor:
        """What `tower.encode_strips(strips, tgt_sizes, ...)` returns: tokens [N, max L, D], rows past a slice's h*w
        zero (the resampler masks them)."""
        if any(p.requires_grad for p in tower.parameters()):
            raise RuntimeError(
                "the vision cache serves a frozen tower only; a trainable one changes every step"
            )
        keys = [slice_key(strip, size) for strip, size in zip(strips, tgt_sizes)]
        lengths = (tgt_sizes[:, 0] * tgt_sizes[:, 1]).tolist()  # [N]
        missing = [i for i, key in enumerate(keys) if key not in self._rows]
        computed = {}
        if missing:
            fresh = tower.encode_strips(
                [strips[i] for i in missing], tgt_sizes[missing], attn_implementation, chunk_size
            )  # [M, L', D]
            for row, i in enumerate(missing):
                computed[keys[i]] = fresh[row, : lengths[i]]
        self.misses += len(missing)
        self.hits += len(keys) - len(missing)
        for key, tokens in computed.items():
            size = tokens.numel() * tokens.element_size()
            if key not in self._rows and self.bytes + size <= self.max_bytes:
                self._rows[key] = tokens.detach().clone()
                self.bytes += size
        rows = [computed.get(key, self._rows.get(key)) for key in keys]
        out = rows[0].new_zeros(len(rows), max(lengths), rows[0].shape[-1])  # [N, max L, D]
        for i, tokens in enumerate(rows):
            out[i, : lengths[i]] = tokens
        return out
