"""The toy world: a synthetic shapes-and-colours world in the real file formats, its tokenizer and preset, box-label
pretraining of the vision tower, and the from-scratch model options (projectors, vision stems).

- `world`: the world generator (`mllm toy make`)
- `tokenizer`: its byte-level BPE tokenizer and the toy model preset (`mllm toy tokenizer`)
- `box_labels`: per-token labels from COCO boxes; `pretrain`: box-label pretraining of the tower (`mllm train vision`)
- `projectors`: the `projector="merge"` / `"mlp"` options of MLLMConfig
"""
