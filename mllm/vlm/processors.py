"""Image-only processors for the families whose transformers processor insists on a video processor.

transformers 5's `LlavaOnevisionProcessor`, `Qwen2VLProcessor` and `Qwen2_5_VLProcessor` take a video processor,
and every video processor needs torchvision, whose wheels do not load with the CPU torch used here
(`operator torchvision::nms does not exist`); without one, building the processor fails inside
`ProcessorMixin.check_argument_for_proper_class`. The image processors themselves have PIL back ends
(`image_processing_pil_*`), which `AutoImageProcessor` falls back to when torchvision is absent.

The classes below are those processors with the video processor left out of their signature: `ProcessorMixin`
derives the sub-processors it checks, saves and loads from the `__init__` signature, so everything else (prompt
expansion of the image token, pixel batching, the chat template, `save_pretrained` / `from_pretrained`) is
transformers' own code, unchanged. Only `videos=` is unavailable. tests/test_vlm.py checks the token ids and pixels
against the stock processor built with its class check bypassed.
"""

from __future__ import annotations

from transformers import LlavaOnevisionProcessor, Qwen2_5_VLProcessor, Qwen2VLProcessor


class LlavaOnevisionImageOnlyProcessor(LlavaOnevisionProcessor):
    """`LlavaOnevisionProcessor` without its video processor (images and text only)."""

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        num_image_tokens=None,
        vision_feature_select_strategy=None,
        chat_template=None,
        image_token="<image>",
        video_token="<video>",
        vision_aspect_ratio="anyres_max_9",
        **kwargs,
    ):
        # ProcessorMixin pairs positional sub-processors with the attributes of this signature: the None in the
        # video processor's place is dropped. It also saves exactly the keyword arguments named here, hence the
        # parent's settings spelled out.
        super().__init__(
            image_processor,
            tokenizer,
            None,
            num_image_tokens=num_image_tokens,
            vision_feature_select_strategy=vision_feature_select_strategy,
            chat_template=chat_template,
            image_token=image_token,
            video_token=video_token,
            vision_aspect_ratio=vision_aspect_ratio,
            **kwargs,
        )


class Qwen2VLImageOnlyProcessor(Qwen2VLProcessor):
    """`Qwen2VLProcessor` without its video processor (images and text only)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


class Qwen25VLImageOnlyProcessor(Qwen2_5_VLProcessor):
    """`Qwen2_5_VLProcessor` without its video processor (images and text only)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


IMAGE_ONLY_PROCESSORS = {
    "llava_onevision": LlavaOnevisionImageOnlyProcessor,
    "qwen2_vl": Qwen2VLImageOnlyProcessor,
    "qwen2_5_vl": Qwen25VLImageOnlyProcessor,
}
"""model_type -> the processor class to load such a directory with; other families use `AutoProcessor`."""
