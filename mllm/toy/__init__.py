"""The toy world: a synthetic shapes-and-colours world in the real file formats, its tokenizer and preset, box-label
pretraining of the vision tower, and the from-scratch model options.

- `world`: the world generator (`mllm toy make`)
- `tokenizer`: its byte-level BPE tokenizer and the toy model preset (`mllm toy tokenizer`)
- `box_labels`: per-token labels from COCO boxes; `pretrain`: box-label pretraining of the tower (`mllm train vision`)
- `projectors`, `stems`: the `MLLMConfig.projector` options "merge" / "mlp" and the `VisionConfig.stem` options
  "conv" / "cnn", registered with `mllm.model.registry` when this package is imported (the registry imports it
  itself when a config names one of them, so toy checkpoints load through `MLLMModel.from_pretrained` / `mllm.load`)
"""

from mllm.model.registry import register_projector, register_stem
from mllm.toy.projectors import PatchMerger, TokenProjector
from mllm.toy.stems import ConvStem, ImageCNNStem

register_projector(PatchMerger.name, PatchMerger)
register_projector(TokenProjector.name, TokenProjector)
register_stem("conv", ConvStem)
register_stem("cnn", ImageCNNStem)
