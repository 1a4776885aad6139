"""Tiny random models of transformers' image-text-to-text families, built in code (nothing downloaded).

`build_tiny(family, out_dir)` writes a model directory (config.json, safetensors, tokenizer, processor files) that
`mllm.load_vlm` opens like a real checkpoint of that family: the tokenizer is a byte-level BPE trained here on a
few sentences plus the family's special tokens, with the family's real chat template (LLaVA-1.5, LLaVA-OneVision and
Qwen2-VL as the llava-hf / Qwen checkpoints ship them; BLIP-2 and InstructBLIP ship none).
"""

from __future__ import annotations

from pathlib import Path

import torch

FAMILIES = ("llava", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "blip-2", "instructblip")

CORPUS = (
    "What is in the image? A red circle on a blue square. Is there a dog? Yes. No. "
    "Describe the picture. There is a cat and a green box at the top left. Where is the ball? "
    "The answer is 3 because two plus one is three. USER: ASSISTANT: Question: Answer:"
)

LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
"""llava-hf/llava-1.5-*-hf's chat_template.json."""

ONEVISION_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + ' '}}{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}"
    "{# Render all video then #}{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}"
    "{{ '<video>' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ '\n' + content['text'] }}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ '\n' + content['text'] }}{% endgeneration %}{% endfor %}{% endif %}{{'<|im_end|>'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
"""llava-hf/llava-onevision-qwen2-*-ov-hf's chat_template.json (its assistant turn opens with "assistant \n", its
generation prompt with "assistant\n": not prefix-consistent, which multi-turn labelling must notice)."""

QWEN2_VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""Qwen/Qwen2-VL-*-Instruct's (and Qwen2.5-VL's) chat template."""

QWEN_SPECIALS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

TINY_TEXT = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)


def _bpe(specials: list[str], bos_template: str | None):
    """A byte-level BPE over CORPUS with `specials` appended; `bos_template` e.g. "<s> $A" adds a bos."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator([CORPUS] * 4, trainer=trainer)
    tokenizer.add_special_tokens(specials)
    if bos_template is not None:
        bos = bos_template.split()[0]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=bos_template, special_tokens=[(bos, tokenizer.token_to_id(bos))]
        )
    return tokenizer


def _fast(tokenizer, **special):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **special)


def llama_tokenizer(extra: tuple[str, ...] = ("<image>",)):
    """LLaVA-1.5's and InstructBLIP-Vicuna's Llama layout: <unk> <s> </s>, a bos in front, pad <pad>."""
    specials = ["<unk>", "<s>", "</s>", "<pad>", *extra]
    return _fast(
        _bpe(specials, "<s> $A"),
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens=list(extra),
    )


def qwen_tokenizer(extra: tuple[str, ...] = ()):
    """Qwen2's layout: no bos, eos <|im_end|> (instruct), pad <|endoftext|>."""
    specials = [*QWEN_SPECIALS, *extra]
    return _fast(
        _bpe(specials, None),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=list(specials[3:]),
    )


def opt_tokenizer():
    """OPT's layout (BLIP-2): bos = eos = </s> in front, pad <pad>."""
    return _fast(
        _bpe(["<pad>", "</s>", "<unk>", "<image>"], "</s> $A"),
        bos_token="</s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens=["<image>"],
    )


def bert_tokenizer():
    """A WordPiece tokenizer in BERT's layout (InstructBLIP's Q-Former reads the instruction with it)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    trainer = trainers.WordPieceTrainer(vocab_size=200, special_tokens=specials, show_progress=False)
    tokenizer.train_from_iterator([CORPUS] * 4, trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        special_tokens=[("[CLS]", tokenizer.token_to_id("[CLS]")), ("[SEP]", tokenizer.token_to_id("[SEP]"))],
    )
    return _fast(
        tokenizer,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )


def _vision(kind: str, image_size: int, patch: int):
    from transformers import CLIPVisionConfig, SiglipVisionConfig

    cls = {"clip": CLIPVisionConfig, "siglip": SiglipVisionConfig}[kind]
    return cls(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch,
    )


def _blip_parts():
    from transformers import Blip2QFormerConfig, Blip2VisionConfig

    vision = Blip2VisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
    )
    qformer = Blip2QFormerConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        encoder_hidden_size=32,
        vocab_size=200,
        max_position_embeddings=64,
    )
    return vision, qformer


def build_llava(out: Path) -> None:
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    tokenizer = llama_tokenizer()
    config = LlavaConfig(
        vision_config=_vision("clip", 32, 8),
        text_config=LlamaConfig(vocab_size=len(tokenizer), **TINY_TEXT),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    _save(LlavaForConditionalGeneration(config), tokenizer, out, eos=[tokenizer.eos_token_id])
    from transformers import LlavaImageProcessorPil, LlavaProcessor

    image_processor = LlavaImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_TEMPLATE,
    ).save_pretrained(out)


def build_llava_onevision(out: Path) -> None:
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessorPil,
        Qwen2Config,
    )

    from mllm.vlm.processors import LlavaOnevisionImageOnlyProcessor

    tokenizer = qwen_tokenizer(("<image>", "<video>"))
    pinpoints = [[32, 32], [32, 64], [64, 32], [64, 64]]
    config = LlavaOnevisionConfig(
        vision_config=_vision("siglip", 32, 8),
        text_config=Qwen2Config(vocab_size=len(tokenizer), **TINY_TEXT),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<video>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        image_grid_pinpoints=pinpoints,
    )
    _save(LlavaOnevisionForConditionalGeneration(config), tokenizer, out, eos=_ids(tokenizer, "<|im_end|>"))
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": 32, "width": 32}, image_grid_pinpoints=pinpoints
    )
    LlavaOnevisionImageOnlyProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        num_image_tokens=16,
        vision_feature_select_strategy="full",
        chat_template=ONEVISION_TEMPLATE,
    ).save_pretrained(out)


def build_qwen2_vl(out: Path, version: str = "2") -> None:
    from transformers import Qwen2VLImageProcessorPil

    from mllm.vlm.processors import Qwen2VLImageOnlyProcessor, Qwen25VLImageOnlyProcessor

    tokenizer = qwen_tokenizer()
    ids = {
        "image_token_id": _ids(tokenizer, "<|image_pad|>")[0],
        "video_token_id": _ids(tokenizer, "<|video_pad|>")[0],
        "vision_start_token_id": _ids(tokenizer, "<|vision_start|>")[0],
        "vision_end_token_id": _ids(tokenizer, "<|vision_end|>")[0],
    }
    text = dict(
        TINY_TEXT, vocab_size=len(tokenizer), rope_scaling={"type": "mrope", "mrope_section": [2, 1, 1]}
    )
    if version == "2":
        from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

        vision = dict(depth=2, embed_dim=32, hidden_size=32, num_heads=2, patch_size=14)
        model = Qwen2VLForConditionalGeneration(Qwen2VLConfig(vision_config=vision, text_config=text, **ids))
        processor_cls = Qwen2VLImageOnlyProcessor
    else:
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        vision = dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            patch_size=14,
            out_hidden_size=32,
            window_size=56,
            fullatt_block_indexes=[1],
        )
        model = Qwen2_5_VLForConditionalGeneration(
            Qwen2_5_VLConfig(vision_config=vision, text_config=text, **ids)
        )
        processor_cls = Qwen25VLImageOnlyProcessor
    _save(model, tokenizer, out, eos=_ids(tokenizer, "<|im_end|>", "<|endoftext|>"))
    image_processor = Qwen2VLImageProcessorPil(min_pixels=4 * 28 * 28, max_pixels=16 * 28 * 28)
    processor_cls(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=QWEN2_VL_TEMPLATE
    ).save_pretrained(out)


def build_blip2(out: Path) -> None:
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        BlipImageProcessorPil,
        OPTConfig,
    )

    tokenizer = opt_tokenizer()
    vision, qformer = _blip_parts()
    text = OPTConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        ffn_dim=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        word_embed_proj_dim=32,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = Blip2Config(
        vision_config=vision,
        qformer_config=qformer,
        text_config=text,
        num_query_tokens=4,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )
    _save(Blip2ForConditionalGeneration(config), tokenizer, out, eos=[tokenizer.eos_token_id])
    image_processor = BlipImageProcessorPil(size={"height": 32, "width": 32})
    Blip2Processor(image_processor=image_processor, tokenizer=tokenizer, num_query_tokens=4).save_pretrained(
        out
    )


def build_instructblip(out: Path) -> None:
    from transformers import (
        BlipImageProcessorPil,
        InstructBlipConfig,
        InstructBlipForConditionalGeneration,
        InstructBlipProcessor,
        LlamaConfig,
    )

    tokenizer = llama_tokenizer()
    vision, qformer = _blip_parts()
    config = InstructBlipConfig(
        vision_config=vision.to_dict(),
        qformer_config=qformer.to_dict(),
        text_config=LlamaConfig(vocab_size=len(tokenizer), **TINY_TEXT).to_dict(),
        num_query_tokens=4,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )
    _save(InstructBlipForConditionalGeneration(config), tokenizer, out, eos=[tokenizer.eos_token_id])
    image_processor = BlipImageProcessorPil(size={"height": 32, "width": 32})
    InstructBlipProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        qformer_tokenizer=bert_tokenizer(),
        num_query_tokens=4,
    ).save_pretrained(out)


def _ids(tokenizer, *tokens: str) -> list[int]:
    return [tokenizer.convert_tokens_to_ids(t) for t in tokens]


def _save(model, tokenizer, out: Path, eos: list[int]) -> None:
    """Random weights with a larger std than the 0.02 init (with it every logit is nearly equal, greedy decoding
    meets ties, and the image barely moves the answer) and small terminator rows (answers do not end at once)."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() > 1:
                parameter.normal_(
                    0.0, 0.5 if name.endswith(("embed_tokens.weight", "lm_head.weight")) else 0.2
                )
        head = model.get_output_embeddings().weight
        head[eos] *= 0.1
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.save_pretrained(out)


BUILDERS = {
    "llava": build_llava,
    "llava_onevision": build_llava_onevision,
    "qwen2_vl": build_qwen2_vl,
    "qwen2_5_vl": lambda out: build_qwen2_vl(out, "2.5"),
    "blip-2": build_blip2,
    "instructblip": build_instructblip,
}


def build_tiny(family: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny random model directory of `family` (one of FAMILIES) to out_dir; returns it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    BUILDERS[family](out)
    return out
