"""mllm: a hackable framework for MiniCPM-V-style multimodal large language models.

    model, processor = mllm.load("MLLM_Excercise_Model")        # the front door (mllm.api), any supported family
    inputs = processor(prompt, [image], return_tensors="pt")    # an MLLMInputs batch
    tokens = model.generate(inputs, tokenizer=processor.tokenizer, max_new_tokens=64)

The public names are imported lazily so that `import mllm` (and `mllm --help`) stays fast. Importing
`mllm.model.modeling` / `mllm.processing.processor` (e.g. through `mllm.MLLMModel`) registers the model with
transformers' Auto classes (`AutoModel`, `AutoModelForImageTextToText`, `AutoProcessor`, `AutoConfig`).
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "load": "mllm.api",
    "load_vlm": "mllm.api",
    "MLLMInputs": "mllm.model.inputs",
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
