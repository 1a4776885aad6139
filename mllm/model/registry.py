"""Vision stems and projectors chosen by name from the config (`VisionConfig.stem`, `MLLMConfig.projector`).

MiniCPM-V's own parts are built in: the linear "patch" stem of SigLIP (`mllm.model.vision`) and the perceiver
"resampler" (`mllm.model.resampler`). Other packages add alternatives with `register_stem` / `register_projector`;
the toy world's from-scratch options ("conv"/"cnn" stems, "merge"/"mlp" projectors) live in `mllm.toy`, which
registers them when imported.

A config naming an unregistered part imports the plugin packages of `PLUGIN_PACKAGES` once (lazily, so the model
layer never imports an application package at module top) and looks again; a name still unknown is a ValueError
naming the config field and the known names.

    stem_class("cnn")(vision_config)  # a module with `out_channels`, `patch_size`, forward(pixels, tgt_sizes)
    projector_class("mlp")(query_num, embed_dim, kv_dim)  # forward(tokens [N, L, kv_dim], tgt_sizes [N, 2])
"""

from __future__ import annotations

from importlib import import_module

PATCH_STEM = "patch"
"""The built-in stem name: SigLIP's linear patch convolution (every real checkpoint)."""
RESAMPLER = "resampler"
"""The built-in projector name: MiniCPM-V's perceiver resampler (every real checkpoint)."""
PLUGIN_PACKAGES = ("mllm.toy",)
"""Packages that register stems or projectors when imported; imported only when a config names an unknown one."""

_STEMS: dict[str, type] = {}
_PROJECTORS: dict[str, type] = {}


def register_stem(name: str, cls: type) -> None:
    """Make `VisionConfig.stem == name` build `cls(vision_config)` before the patch convolution."""
    _register(_STEMS, PATCH_STEM, "stem", name, cls)


def register_projector(name: str, cls: type) -> None:
    """Make `MLLMConfig.projector == name` build `cls(query_num, embed_dim, kv_dim)` in place of the resampler."""
    _register(_PROJECTORS, RESAMPLER, "projector", name, cls)


def stem_class(name: str) -> type:
    """The stem class registered as `name` (not "patch", which is no extra module)."""
    return _lookup(_STEMS, PATCH_STEM, "MLLMConfig.vision_config.stem", name)


def projector_class(name: str) -> type:
    """The projector class registered as `name` (not "resampler", which `MLLMModel` builds itself)."""
    return _lookup(_PROJECTORS, RESAMPLER, "MLLMConfig.projector", name)


def _register(table: dict[str, type], builtin: str, kind: str, name: str, cls: type) -> None:
    if name == builtin or table.get(name, cls) is not cls:
        raise ValueError(f"a {kind} named {name!r} is already registered")
    table[name] = cls


def _lookup(table: dict[str, type], builtin: str, field: str, name: str) -> type:
    if name not in table:
        for package in PLUGIN_PACKAGES:  # the one plugin hook (see tests/test_layers.py)
            import_module(package)
    if name not in table:
        known = sorted([builtin, *table])
        raise ValueError(f"{field} must be one of {known}, got {name!r}")
    return table[name]
