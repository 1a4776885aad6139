"""Chat messages and images -> a left-padded batch for `MLLMModel.forward` / `generate`.

This is the one place that builds prompts (inference and the SFT dataset both call it):
1. `prepare_chat_inputs`: each PIL image in a message becomes the marker `(<image>./</image>)`, the items of a
   content list are joined by newlines (as MiniCPM-V 2.6 `chat()` does), and the tokenizer's chat template renders
   the conversation.
2. `expand_image_placeholders`: each marker is replaced by that image's placeholder (image id + `<unk>` runs).
3. `encode`: tokenize, and find `image_bound`, the `[start, end)` ranges of `<unk>` positions that the resampler
   output overwrites.
4. `__call__` / `collate`: left padding, an attention mask from the real lengths (not `input_ids != 0`: id 0 is
   "!" in Qwen2) and position ids.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from mllm.processing.image_processing import MLLMImageProcessor, to_rgb

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

IMAGE_MARKER = "(<image>./</image>)"
"""What an image becomes in the chat text before placeholder expansion (MiniCPM-V 2.6 convention)."""

CHAT_ROLES = ("user", "assistant", "system")

CONTROL_TOKENS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>")
"""ChatML's control tokens. Text that contains one is refused (`check_control_tokens`): rendered into the prompt
it would become the control token itself, so a user could close their turn and write the assistant's."""

TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model")
"""A tokenizer's vocabulary lives in one of these (tokenizer_config.json alone gives only the added tokens)."""


@dataclass(frozen=True)
class SpecialTokenIds:
    """Ids of the tokens the processor and the model look for, resolved from the tokenizer's vocabulary."""

    unk: int
    """`<unk>`: the stand-in for one visual feature."""
    im_start: int
    """`<image>`: opens the whole-image feature run."""
    im_end: int
    """`</image>`: closes the whole-image feature run."""
    slice_start: int
    """`<slice>`: opens a slice feature run."""
    slice_end: int
    """`</slice>`: closes a slice feature run."""
    im_id_start: int
    """`<image_id>`: opens the image index."""
    im_id_end: int
    """`</image_id>`: closes the image index."""
    chat_start: int
    """`<|im_start|>`: ChatML turn start (also the bos of MiniCPM-V 2.6)."""
    chat_end: int
    """`<|im_end|>`: ChatML turn end, a generation terminator."""
    endoftext: int
    """`<|endoftext|>`: end of text, a generation terminator."""

    @property
    def terminators(self) -> list[int]:
        """Token ids that end generation."""
        return [self.chat_end, self.endoftext]


def resolve_special_tokens(
    tokenizer: PreTrainedTokenizerBase, image_processor: MLLMImageProcessor
) -> SpecialTokenIds:
    """Look up every special token with `convert_tokens_to_ids` (works without the checkpoint's remote code).

    A token that is missing, or that the tokenizer would split into several pieces, is a ValueError naming it.
    """
    cfg = image_processor.config
    tokens = {
        "unk": cfg.unk,
        "im_start": cfg.im_start,
        "im_end": cfg.im_end,
        "slice_start": cfg.slice_start,
        "slice_end": cfg.slice_end,
        "im_id_start": cfg.im_id_start,
        "im_id_end": cfg.im_id_end,
        "chat_start": "<|im_start|>",
        "chat_end": "<|im_end|>",
        "endoftext": "<|endoftext|>",
    }
    vocab = tokenizer.get_vocab()
    where = getattr(tokenizer, "name_or_path", "") or "<in-memory tokenizer>"
    ids = {}
    for field_name, token in tokens.items():
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token not in vocab or token_id is None or vocab[token] != token_id:
            raise ValueError(f"special token {token!r} is not in the vocabulary of the tokenizer at {where}")
        if tokenizer.encode(token, add_special_tokens=False) != [token_id]:
            raise ValueError(
                f"special token {token!r} of the tokenizer at {where} does not encode as one token"
            )
        ids[field_name] = token_id
    return SpecialTokenIds(**ids)


IMAGE_TAGS: tuple[str, ...] = ("<image>", "</image>", "<slice>", "</slice>", "<image_id>", "</image_id>")
"""The tags that frame image features in a prompt; they are input-only and never belong in an answer."""


def without_image_tags(text: str) -> str:
    """`text` with every IMAGE_TAGS string removed (an undertrained model may have generated some)."""
    for tag in IMAGE_TAGS:
        text = text.replace(tag, "")
    return text


def check_control_tokens(text: str, where: str) -> None:
    """Refuse text that contains a ChatML control token (a ValueError naming it and `where`)."""
    found = sorted((text.find(token), token) for token in CONTROL_TOKENS if token in text)
    if found:
        raise ValueError(
            f"{where}: contains the control token {found[0][1]!r}; text may not hold ChatML control tokens "
            f"({', '.join(CONTROL_TOKENS)})"
        )


def check_prompt_length(n_tokens: int, max_length: int | None, where: str) -> None:
    """The prompt-length check of every entry point (web page, `mllm chat`, `mllm answer`): a ValueError when a
    prompt of `n_tokens` (image placeholders included) exceeds `max_length`."""
    if max_length is not None and n_tokens > max_length:
        raise ValueError(
            f"{where}: the prompt has {n_tokens} tokens after image expansion, more than max_length={max_length}"
        )


def build_chat_messages(msgs: list[dict[str, Any]]) -> tuple[list[dict[str, str]], list[Image.Image]]:
    """Messages whose content mixes strings and PIL images -> text-only messages (images as IMAGE_MARKER) and
    the images in order of appearance. The input is not modified.

    Earlier assistant answers are put in the prompt without IMAGE_TAGS: a tag the model once generated would
    otherwise open a bogus image range and make every later turn of the conversation fail. In user and system
    text such a tag is still an error (the processor names it), since it would silently stand for an image. Text of
    any role that holds a ChatML control token is refused (`check_control_tokens`)."""
    if not isinstance(msgs, (list, tuple)) or not msgs:
        raise ValueError(f"msgs: expected a non-empty list of messages, got {msgs!r:.80}")
    messages, images = [], []
    for i, msg in enumerate(msgs):
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise ValueError(f"msgs[{i}]: expected a dict with 'role' and 'content', got {msg!r:.80}")
        role, content = msg["role"], msg["content"]
        if role not in CHAT_ROLES:
            raise ValueError(f"msgs[{i}].role: unknown role {role!r}; expected one of {CHAT_ROLES}")
        items = [content] if isinstance(content, (str, Image.Image)) else content
        if not isinstance(items, (list, tuple)):
            raise ValueError(f"msgs[{i}].content: expected a string or a list, got {type(content).__name__}")
        parts = []
        for j, item in enumerate(items):
            if isinstance(item, Image.Image):
                images.append(item)
                parts.append(IMAGE_MARKER)
            elif isinstance(item, str):
                check_control_tokens(item, f"msgs[{i}].content")
                parts.append(without_image_tags(item) if role == "assistant" else item)
            else:
                raise ValueError(
                    f"msgs[{i}].content[{j}]: expected a str or a PIL image, got {type(item).__name__}"
                )
        messages.append({"role": role, "content": "\n".join(parts)})
    return messages, images


def load_tokenizer(model_dir: str | Path) -> PreTrainedTokenizerBase:
    """AutoTokenizer (no remote code) from a model directory, checked: a vocabulary file present and readable, and
    the tokenizer's size consistent with config.json's `vocab_size` (at most that, and more than half of it).

    Without these checks a directory that lost its tokenizer.json loads as a tokenizer of the added tokens alone,
    and every command would run on (and write) nonsense. Errors are ValueErrors naming the directory and file."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    model_dir = Path(model_dir)
    present = [name for name in TOKENIZER_FILES if (model_dir / name).is_file()]
    if not present:
        raise ValueError(
            f"{model_dir}: no tokenizer vocabulary (none of {', '.join(TOKENIZER_FILES)}); copy the tokenizer files "
            "of the model into this directory"
        )
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        path = model_dir / name
        if path.is_file():
            try:
                json.loads(path.read_bytes().decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise ValueError(f"{path}: not a readable tokenizer file ({exc})") from exc
    # The official layout's tokenizer class (named by tokenizer_config.json's `auto_map`) only adds attribute
    # shortcuts to the fast tokenizer that tokenizer.json describes whole, so that one is loaded directly.
    config_path = model_dir / "tokenizer_config.json"
    remote = config_path.is_file() and "auto_map" in json.loads(config_path.read_bytes().decode("utf-8"))
    loader = PreTrainedTokenizerFast if remote else AutoTokenizer
    try:
        tokenizer = loader.from_pretrained(str(model_dir))
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise ValueError(
            f"{model_dir}: the tokenizer files do not load ({type(exc).__name__}: {exc})"
        ) from exc
    vocab_size = _config_vocab_size(model_dir)
    if vocab_size is not None and not vocab_size / 2 < len(tokenizer) <= vocab_size:
        raise ValueError(
            f"{model_dir}: the tokenizer has {len(tokenizer)} tokens but config.json's vocab_size is {vocab_size}; "
            "the tokenizer files do not belong to this model (or are incomplete)"
        )
    return tokenizer


def _config_vocab_size(model_dir: Path) -> int | None:
    """config.json's vocab_size (None without a config.json, e.g. a LoRA adapter directory)."""
    path = model_dir / "config.json"
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_bytes().decode("utf-8")).get("vocab_size")
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as exc:
        raise ValueError(f"{path}: not a readable config ({exc})") from exc
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{path}: field 'vocab_size' must be a positive integer, got {value!r}")
    return value


def left_pad(sequences: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D id tensors -> (ids [B, T] left-padded with pad_id, attention mask [B, T] long from the real lengths)."""
    length = max((len(s) for s in sequences), default=0)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)  # [B, T]
    mask = torch.zeros((len(sequences), length), dtype=torch.long)  # [B, T]
    for b, seq in enumerate(sequences):
        if len(seq):
            ids[b, length - len(seq) :] = seq
            mask[b, length - len(seq) :] = 1
    return ids, mask


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """cumsum(mask) - 1 on real tokens, 1 on padding (what HF generate computes, and what the fixture used)."""
    position_ids = attention_mask.long().cumsum(-1) - 1  # [B, T]
    return position_ids.masked_fill(attention_mask == 0, 1)


class MLLMProcessor:
    """Tokenizer + image processor: builds chat prompts and batches them for the model."""

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, image_processor: MLLMImageProcessor | None = None
    ) -> None:
        self.tokenizer = tokenizer
        self.image_processor = image_processor if image_processor is not None else MLLMImageProcessor()
        self.special_ids = resolve_special_tokens(tokenizer, self.image_processor)

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, **image_processor_overrides: Any) -> MLLMProcessor:
        """Tokenizer and preprocessor_config.json from a checkpoint dir, without running remote code (see
        `load_tokenizer`)."""
        tokenizer = load_tokenizer(model_dir)
        return cls(tokenizer, MLLMImageProcessor.from_pretrained(model_dir, **image_processor_overrides))

    def save_pretrained(self, out_dir: str | Path) -> None:
        """Write the tokenizer files and preprocessor_config.json beside a saved model."""
        self.tokenizer.save_pretrained(str(out_dir))
        self.image_processor.save_pretrained(out_dir)

    @property
    def pad_token_id(self) -> int:
        """The tokenizer's pad id, or 0 when it has none (as the reference pads)."""
        pad = self.tokenizer.pad_token_id
        return 0 if pad is None else int(pad)

    def prepare_chat_inputs(
        self, msgs: list[dict[str, Any]], add_generation_prompt: bool = True
    ) -> tuple[str, list[Image.Image]]:
        """Messages -> (chat-template prompt with one IMAGE_MARKER per image, the images in order)."""
        messages, images = build_chat_messages(msgs)
        prompt = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        return prompt, images

    def expand_image_placeholders(
        self,
        text: str,
        images: list[Image.Image],
        max_slice_nums: int | None = None,
        use_image_id: bool | None = None,
        where: str = "text",
    ) -> tuple[str, list[torch.Tensor], torch.Tensor]:
        """Replace the i-th IMAGE_MARKER by image i's placeholder (ids counted within the text).

        Returns (expanded text, [3, p, L] strips of all slices in order, tgt_sizes [n_slices, 2] int32).
        """
        if not isinstance(text, str):
            raise ValueError(f"{where}: expected a str prompt, got {type(text).__name__}")
        if images is None:
            images = []
        if not isinstance(images, (list, tuple)):
            raise ValueError(f"{where}: expected a list of images, got {type(images).__name__}")
        chunks = text.split(IMAGE_MARKER)
        if len(chunks) - 1 != len(images):
            raise ValueError(
                f"{where}: the prompt has {len(chunks) - 1} image markers {IMAGE_MARKER!r} but {len(images)} images were given"
            )
        pieces = [chunks[0]]
        strips: list[torch.Tensor] = []
        sizes = [torch.zeros(0, 2, dtype=torch.int32)]
        for i, image in enumerate(images):
            image = to_rgb(image, f"{where}, image {i}")
            image_strips, image_tgt = self.image_processor.preprocess_image(image, max_slice_nums)
            strips.extend(image_strips)
            sizes.append(image_tgt)
            pieces.append(self.image_processor.get_placeholder(image.size, i, max_slice_nums, use_image_id))
            pieces.append(chunks[i + 1])
        return "".join(pieces), strips, torch.cat(sizes, dim=0)

    def check_prompt(
        self,
        msgs: list[dict[str, Any]],
        max_slice_nums: int | None = None,
        max_length: int | None = None,
        use_image_id: bool | None = None,
    ) -> int:
        """A conversation's prompt length in tokens, from the images' sizes alone (no pixels are resized or sliced);
        a ValueError for whatever `chat_batch` would refuse: control tokens, literal image tags, a prompt over
        `max_length`. Lets a batch job find a bad record before it spoils a batch."""
        prompt, images = self.prepare_chat_inputs(msgs)
        chunks = prompt.split(IMAGE_MARKER)
        if len(chunks) - 1 != len(images):
            raise ValueError(
                f"the prompt has {len(chunks) - 1} image markers {IMAGE_MARKER!r} but {len(images)} images"
            )
        pieces, ranges = [chunks[0]], 0
        cfg = self.image_processor.config
        for i, image in enumerate(images):
            placeholder = self.image_processor.get_placeholder(image.size, i, max_slice_nums, use_image_id)
            ranges += placeholder.count(cfg.im_start) + placeholder.count(cfg.slice_start)
            pieces += [placeholder, chunks[i + 1]]
        ids = self.tokenizer.encode("".join(pieces), add_special_tokens=False)
        check_prompt_length(len(ids), max_length, "prompt")
        if len(self.image_bound_from_ids(torch.tensor(ids, dtype=torch.long))) != ranges:
            raise ValueError("the text contains literal image tags (<image>, </image>, <slice>, </slice>)")
        return len(ids)

    def image_bound_from_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[n, 2] long: for each `<image>`/`<slice>` the index after it and the index of its closing tag."""
        ids = torch.as_tensor(input_ids).view(-1)  # [T]
        sp = self.special_ids
        starts = torch.nonzero((ids == sp.im_start) | (ids == sp.slice_start)).view(-1) + 1
        ends = torch.nonzero((ids == sp.im_end) | (ids == sp.slice_end)).view(-1)
        if len(starts) != len(ends) or bool((ends < starts).any()) or bool((starts[1:] <= ends[:-1]).any()):
            raise ValueError(
                f"unbalanced image tags in the token ids: {len(starts)} opening <image>/<slice> tags at "
                f"{(starts - 1).tolist()} and {len(ends)} closing tags at {ends.tolist()}"
            )
        return torch.stack([starts, ends], dim=1).long()  # [n, 2]

    def encode(
        self,
        prompt_text: str,
        images: list[Image.Image] | None = None,
        max_slice_nums: int | None = None,
        max_length: int | None = None,
        use_image_id: bool | None = None,
        sample_idx: int = 0,
    ) -> dict[str, Any]:
        """One prompt with markers and its images -> unpadded inputs (1-D input_ids, image_bound, strips...)."""
        where = f"sample {sample_idx}"
        expanded, strips, tgt_sizes = self.expand_image_placeholders(
            prompt_text, images or [], max_slice_nums, use_image_id, where=where
        )
        ids = self.tokenizer.encode(expanded, add_special_tokens=False)
        check_prompt_length(len(ids), max_length, where)
        input_ids = torch.tensor(ids, dtype=torch.long)  # [T]
        try:
            image_bound = self.image_bound_from_ids(input_ids)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc} (does the text contain literal image tags?)") from exc
        if len(image_bound) != len(tgt_sizes):
            raise ValueError(
                f"{where}: {len(image_bound)} image feature ranges in the prompt but {len(tgt_sizes)} image slices "
                "(does the text contain literal <image>/<slice> tags?)"
            )
        return {
            "input_ids": input_ids,
            "image_bound": image_bound,
            "pixel_values": strips,
            "tgt_sizes": tgt_sizes,
            "image_sizes": [image.size for image in images or []],
            "expanded_text": expanded,
        }

    def collate(self, encoded: list[dict[str, Any]]) -> dict[str, Any]:
        """Left-pad `encode` outputs into a batch; image_bound is shifted by each sample's pad length."""
        input_ids, attention_mask = left_pad([e["input_ids"] for e in encoded], self.pad_token_id)
        pads = [input_ids.shape[1] - len(e["input_ids"]) for e in encoded]
        return {
            "input_ids": input_ids,  # [B, T]
            "attention_mask": attention_mask,  # [B, T]
            "position_ids": position_ids_from_mask(attention_mask),  # [B, T]
            "image_bound": [e["image_bound"] + pad for e, pad in zip(encoded, pads)],
            "pixel_values": [e["pixel_values"] for e in encoded],
            "tgt_sizes": [e["tgt_sizes"] for e in encoded],
            "image_sizes": [e["image_sizes"] for e in encoded],
        }

    def __call__(
        self,
        texts: list[str],
        images: list[list[Image.Image]] | None = None,
        max_slice_nums: int | None = None,
        max_length: int | None = None,
        use_image_id: bool | None = None,
    ) -> dict[str, Any]:
        """Prompts with markers and per-sample image lists -> a batch for `MLLMModel.forward(data)`."""
        if isinstance(texts, str) or not isinstance(texts, (list, tuple)):
            raise ValueError(f"texts: expected a list of prompts, got {type(texts).__name__}")
        if images is None:
            images = [[] for _ in texts]
        if not isinstance(images, (list, tuple)) or len(images) != len(texts):
            raise ValueError(
                f"images: expected one list of images per prompt ({len(texts)} prompts), got {images!r:.80}"
            )
        encoded = []
        for b, (text, sample_images) in enumerate(zip(texts, images)):
            if sample_images is not None and not isinstance(sample_images, (list, tuple)):
                raise ValueError(
                    f"images[{b}]: expected a list of images, got {type(sample_images).__name__}"
                )
            encoded.append(
                self.encode(text, sample_images, max_slice_nums, max_length, use_image_id, sample_idx=b)
            )
        return self.collate(encoded)

    def chat_batch(
        self,
        msgs_batch: list[list[dict[str, Any]]],
        max_slice_nums: int | None = None,
        max_length: int | None = None,
        use_image_id: bool | None = None,
    ) -> dict[str, Any]:
        """Several conversations -> prompts (with generation prompt) -> one left-padded batch."""
        if not isinstance(msgs_batch, (list, tuple)) or not msgs_batch:
            raise ValueError("msgs_batch: expected a non-empty list of conversations")
        texts, images = [], []
        for b, msgs in enumerate(msgs_batch):
            try:
                prompt, sample_images = self.prepare_chat_inputs(msgs)
            except ValueError as exc:
                raise ValueError(f"msgs_batch[{b}]: {exc}") from exc
            texts.append(prompt)
            images.append(sample_images)
        return self(texts, images, max_slice_nums, max_length, use_image_id)
