"""mllm: a hackable framework for MiniCPM-V-style multimodal large language models.

The public names are imported lazily so that `import mllm` (and `mllm --help`) stays fast.
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "MLLMConfig": "mllm.model.config",
    "MLLMModel": "mllm.model.modeling",
    "MLLMProcessor": "mllm.processing.processor",
    "MLLMImageProcessor": "mllm.processing.image_processing",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'mllm' has no attribute {name!r}")
