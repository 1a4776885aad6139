"""A small tokenizer for the toy world, and the tiny model-directory preset that uses it.

The real MiniCPM-V 2.6 tokenizer has ~152k tokens; a model learning from scratch on a CPU needs a vocabulary of a few
hundred. The tokenizer built here is trained on the toy corpus but has exactly the pipeline and file layout of the
real one (and of the `minicpmv26_tiny` fixture): NFC normaliser, Qwen2 split regex, byte-level BPE without prefix
space, the 256 byte symbols first in GPT-2 `bytes_to_unicode` order, the MiniCPM-V special tokens appended at the end,
and the ChatML chat template. So every code path that serves the real checkpoint (prompt building, image
placeholders, label masking, decoding) runs unchanged on the toy preset.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

QWEN2_SPLIT_REGEX = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
"""Qwen2's pre-tokenizer split: digits are split one at a time, which is what makes coordinates learnable."""

SPECIAL_TOKENS: tuple[str, ...] = (
    "<unk>",
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<image>",
    "</image>",
    "<ref>",
    "</ref>",
    "<box>",
    "</box>",
    "<quad>",
    "</quad>",
    "<point>",
    "</point>",
    "<slice>",
    "</slice>",
    "<image_id>",
    "</image_id>",
)
"""MiniCPM-V special tokens in the fixture's id order (appended after the BPE vocabulary)."""

ADDITIONAL_SPECIAL_TOKENS: tuple[str, ...] = SPECIAL_TOKENS[4:]
BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, UNK_TOKEN = "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<unk>"

CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
"""ChatML with MiniCPM-V's default system message (the same template string as the real tokenizer_config.json)."""

CHATML_TEMPLATE_NO_DEFAULT_SYSTEM = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
"""The same ChatML without the default system message (a system turn is rendered only when the conversation has
one): 11 tokens less per toy sample, about a fifth of a yes/no question's prompt."""

CHAT_CORPUS: tuple[str, ...] = (
    "system\nYou are a helpful assistant.",
    "user\n",
    "assistant\n",
)
"""Always part of the training corpus, so the role names become single tokens as in the real vocabulary."""
CHAT_CORPUS_REPEAT = 50
"""Weight of CHAT_CORPUS: every rendered conversation contains the role names, so they deserve their merges."""


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map; its order fixes ids 0..255 (id 0 is "!")."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


def special_token_entry(content: str) -> dict[str, Any]:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}


def train_bpe(corpus_texts: Iterable[str], vocab_size: int):
    """Train the byte-level BPE and append the special tokens; returns a `tokenizers.Tokenizer`."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tokenizer.post_processor = processors.ByteLevel(
        add_prefix_space=False, trim_offsets=False, use_regex=False
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPECIAL_TOKENS),
        min_frequency=2,
        show_progress=False,
        initial_alphabet=list(bytes_to_unicode().values()),
        special_tokens=[],
    )
    tokenizer.train_from_iterator(
        list(CHAT_CORPUS) * CHAT_CORPUS_REPEAT + list(corpus_texts), trainer=trainer
    )
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tokenizer


def check_byte_ids(tokenizer_json: dict) -> None:
    """The real layout puts the 256 byte symbols at ids 0..255 in bytes_to_unicode order: verify, don't assume."""
    vocab = tokenizer_json["model"]["vocab"]
    for b, char in bytes_to_unicode().items():
        index = list(bytes_to_unicode()).index(b)
        assert vocab.get(char) == index, f"byte symbol {char!r} has id {vocab.get(char)}, expected {index}"


def tokenizer_config(first_special_id: int, default_system: bool = True) -> dict[str, Any]:
    """tokenizer_config.json in the fixture's layout (loads as Qwen2Tokenizer, no remote code); without
    `default_system` its chat template adds no system message of its own."""
    decoder = {
        str(first_special_id + k): {**special_token_entry(token), "special": True}
        for k, token in enumerate(SPECIAL_TOKENS)
    }
    return {
        "add_prefix_space": False,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": list(ADDITIONAL_SPECIAL_TOKENS),
        "bos_token": BOS_TOKEN,
        "chat_template": CHATML_TEMPLATE if default_system else CHATML_TEMPLATE_NO_DEFAULT_SYSTEM,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS_TOKEN,
        "errors": "replace",
        "model_max_length": 32768,
        "pad_token": PAD_TOKEN,
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": UNK_TOKEN,
    }


def special_tokens_map() -> dict[str, Any]:
    return {
        "additional_special_tokens": list(ADDITIONAL_SPECIAL_TOKENS),
        "bos_token": special_token_entry(BOS_TOKEN),
        "eos_token": special_token_entry(EOS_TOKEN),
        "pad_token": special_token_entry(PAD_TOKEN),
        "unk_token": special_token_entry(UNK_TOKEN),
    }


def build_toy_tokenizer(
    corpus_texts: Iterable[str], out_dir: str | Path, vocab_size: int = 600, default_system: bool = True
) -> Path:
    """Train the toy tokenizer on `corpus_texts` and save tokenizer.json, tokenizer_config.json and
    special_tokens_map.json into `out_dir`; returns `out_dir`. `default_system` picks the chat template: MiniCPM-V's
    (a default system message before every conversation) or the same ChatML without it.

    `vocab_size` counts everything (bytes, merges, specials). On a small corpus the BPE stops early when no pair occurs
    twice, so the final size may be smaller: read `len(tokenizer)` rather than trusting the argument.
    """
    if vocab_size < 256 + len(SPECIAL_TOKENS) + 1:
        raise ValueError(
            f"vocab_size must exceed {256 + len(SPECIAL_TOKENS)} (bytes + special tokens), got {vocab_size}"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_bpe(corpus_texts, vocab_size)
    data = json.loads(tokenizer.to_str())
    check_byte_ids(data)
    # Spell the file as the real one does: merges as "a b" strings, and the decoder's (behaviour-neutral) fields,
    # which `decoders.ByteLevel` does not take as arguments.
    data["model"]["merges"] = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    data["decoder"] = {
        "type": "ByteLevel",
        "add_prefix_space": False,
        "trim_offsets": False,
        "use_regex": False,
    }
    data["model"].update(continuing_subword_prefix="", end_of_word_suffix="")  # None and "" behave the same
    first_special_id = len(data["model"]["vocab"])
    assert [t["id"] for t in data["added_tokens"]] == list(
        range(first_special_id, first_special_id + len(SPECIAL_TOKENS))
    )
    (out / "tokenizer.json").write_text(
        json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    write_config_json(out / "tokenizer_config.json", tokenizer_config(first_special_id, default_system))
    write_config_json(out / "special_tokens_map.json", special_tokens_map())
    logger.info("toy tokenizer: %d tokens written to %s", first_special_id + len(SPECIAL_TOKENS), out)
    return out


def write_config_json(path: Path, data: dict[str, Any], indent: int = 2, sort_keys: bool = False) -> None:
    """JSON as the fixture spells it (config.json sorted as transformers writes it; others in their own order)."""
    path.write_text(
        json.dumps(data, indent=indent, ensure_ascii=False, sort_keys=sort_keys) + "\n", encoding="utf-8"
    )


def toy_corpus(world_dir: str | Path) -> list[str]:
    """All texts of a toy world (SFT turns, REC templates and expressions, preference answers) plus sample box
    strings in the three coordinate spellings, so the tokenizer sees every kind of text the pipelines produce."""
    world = Path(world_dir)
    sft = world / "sft" / "train.json"
    if not sft.is_file():
        raise ValueError(f"{sft} not found: is {world} a toy world made by `mllm toy make`?")
    texts = [turn["content"] for item in json.loads(sft.read_text()) for turn in item["conversations"]]
    templates = json.loads((world / "grounding" / "templates_rec.json").read_text())
    texts += templates
    for line in (world / "grounding" / "rec_train.jsonl").read_text().splitlines():
        record = json.loads(line)
        x1, y1, x2, y2 = record["bbox"]
        texts.append(record["expression"])
        texts.append(f"<ref>{record['expression']}</ref><box>({x1},{y1}),({x2},{y2})</box>")
        w, h = record.get("width", 112), record.get("height", 112)
        texts.append(f"[{x1 / w:.3f},{y1 / h:.3f},{x2 / w:.3f},{y2 / h:.3f}]")
    for item in json.loads((world / "preference" / "preference_train.json").read_text()):
        texts += [item["question"], item["chosen"], item["rejected"]]
    return texts


@dataclass
class ToyPresetConfig:
    """Sizes of the tiny preset: small enough to learn the toy world on 2 CPU cores in minutes."""

    llm_hidden_size: int = 256
    """LLM width."""
    llm_layers: int = 4
    """LLM decoder layers."""
    llm_heads: int = 4
    """LLM attention heads (head_dim 64)."""
    llm_kv_heads: int = 2
    """LLM key/value heads (grouped-query attention as in Qwen2)."""
    llm_intermediate_size: int = 768
    """LLM SwiGLU hidden width."""
    vision_hidden_size: int = 128
    """Vision tower width."""
    vision_layers: int = 4
    """Vision encoder layers actually built (drop_vision_last_layer is false in the preset)."""
    vision_heads: int = 2
    """Vision attention heads."""
    vision_intermediate_size: int = 512
    """Vision MLP hidden width."""
    image_size: int = 112
    """Side of the toy images; also the slice scale resolution and the vision position grid (112/14 = 8x8)."""
    patch_size: int = 14
    """Vision patch side in pixels (MiniCPM-V's 14; 8 suits the "cnn" vision stem: a 14x14 token grid)."""
    query_num: int = 16
    """Image tokens per image in the LLM prompt (image_feature_size)."""
    max_position_embeddings: int = 2048
    """Longest sequence; toy prompts are far shorter."""
    rope_theta: float = 1000000.0
    """RoPE base (Qwen2's 1e6 by default). With 1e6 and 64-wide heads, 20 of the 32 rotation frequencies turn by
    less than a radian over a 60-token toy prompt, so they carry almost no position."""
    use_image_id: bool = True
    """Prefix each image's placeholder with `<image_id>0</image_id>` (MiniCPM-V 2.6 does; 3 tokens per toy
    sample that say nothing with one image per prompt)."""


def load_tokenizer_facts(tokenizer_dir: Path) -> tuple[int, int, int]:
    """(vocab size, id of <|endoftext|>, id of <|im_end|>) read from tokenizer.json, without transformers."""
    path = tokenizer_dir / "tokenizer.json"
    if not path.is_file():
        raise ValueError(f"tokenizer_dir {tokenizer_dir} has no tokenizer.json")
    data = json.loads(path.read_text(encoding="utf-8"))
    ids = {t["content"]: t["id"] for t in data["added_tokens"]}
    missing = [t for t in (PAD_TOKEN, EOS_TOKEN) if t not in ids]
    if missing:
        raise ValueError(f"{path} lacks the special tokens {missing}")
    size = max([*data["model"]["vocab"].values(), *ids.values()]) + 1
    return size, ids[PAD_TOKEN], ids[EOS_TOKEN]


def model_config(vocab_size: int, bos_id: int, eos_id: int, cfg: ToyPresetConfig) -> dict[str, Any]:
    """config.json in the fixture's (template `ModelConfig`) layout, sized by `cfg`."""
    return {
        "architectures": ["MLLMModel"],
        "attention_dropout": 0.0,
        "batch_vision_input": True,
        "bos_token_id": bos_id,
        "drop_vision_last_layer": False,
        "eos_token_id": eos_id,
        "hidden_act": "silu",
        "hidden_size": cfg.llm_hidden_size,
        "image_size": cfg.image_size,
        "initializer_range": 0.02,
        "intermediate_size": cfg.llm_intermediate_size,
        "max_position_embeddings": cfg.max_position_embeddings,
        "max_window_layers": 28,
        "model_type": "mllm",
        "num_attention_heads": cfg.llm_heads,
        "num_hidden_layers": cfg.llm_layers,
        "num_key_value_heads": cfg.llm_kv_heads,
        "patch_size": cfg.patch_size,
        "query_num": cfg.query_num,
        "rms_norm_eps": 1e-06,
        "rope_theta": cfg.rope_theta,
        "slice_config": {
            "max_slice_nums": 1,
            "model_type": "mllm",
            "patch_size": cfg.patch_size,
            "scale_resolution": cfg.image_size,
        },
        "slice_mode": True,
        "sliding_window": 131072,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "use_cache": True,
        "use_image_id": cfg.use_image_id,
        "use_sliding_window": False,
        "version": 2.6,
        "vision_batch_size": 16,
        "vision_config": {
            "hidden_size": cfg.vision_hidden_size,
            "image_size": cfg.image_size,
            "intermediate_size": cfg.vision_intermediate_size,
            "model_type": "siglip",
            "num_attention_heads": cfg.vision_heads,
            "num_hidden_layers": cfg.vision_layers,
            "patch_size": cfg.patch_size,
        },
        "vocab_size": vocab_size,
    }


def preprocessor_config(cfg: ToyPresetConfig) -> dict[str, Any]:
    """preprocessor_config.json as the fixture's, with one slice per image at the toy resolution."""
    return {
        "image_processor_type": "ModelImageProcessor",
        "processor_class": "ModelProcessor",
        "max_slice_nums": 1,
        "scale_resolution": cfg.image_size,
        "patch_size": cfg.patch_size,
        "use_image_id": cfg.use_image_id,
        "image_feature_size": cfg.query_num,
        "im_start": "<image>",
        "im_end": "</image>",
        "slice_start": "<slice>",
        "slice_end": "</slice>",
        "unk": "<unk>",
        "im_id_start": "<image_id>",
        "im_id_end": "</image_id>",
        "slice_mode": True,
        "norm_mean": [0.5, 0.5, 0.5],
        "norm_std": [0.5, 0.5, 0.5],
        "version": 1.0,
    }


TOKENIZER_FILES: tuple[str, ...] = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def write_toy_preset(
    out_dir: str | Path, tokenizer_dir: str | Path, config: ToyPresetConfig | None = None, **extra_config: Any
) -> Path:
    """Write a model-directory skeleton (config.json, preprocessor_config.json, the tokenizer files); weights are
    written later by whoever initialises the model. `extra_config` keys are added to config.json as they are (for
    config options of the model classes that the toy preset turns on). Returns `out_dir`."""
    cfg = config or ToyPresetConfig()
    if cfg.patch_size < 1 or cfg.image_size % cfg.patch_size:
        raise ValueError(
            f"ToyPresetConfig.image_size must be a multiple of patch_size, got {cfg.image_size} and {cfg.patch_size}"
        )
    tok_dir, out = Path(tokenizer_dir), Path(out_dir)
    vocab_size, bos_id, eos_id = load_tokenizer_facts(tok_dir)
    out.mkdir(parents=True, exist_ok=True)
    config_json = model_config(vocab_size, bos_id, eos_id, cfg)
    config_json.update(extra_config)
    write_config_json(out / "config.json", config_json, sort_keys=True)
    write_config_json(out / "preprocessor_config.json", preprocessor_config(cfg), indent=4)
    if tok_dir.resolve() != out.resolve():
        for name in TOKENIZER_FILES:
            source = tok_dir / name
            if not source.is_file():
                raise ValueError(f"tokenizer_dir {tok_dir} has no {name}")
            (out / name).write_bytes(source.read_bytes())
    return out
