"""Chat messages and images -> an `MLLMInputs` batch for `MLLMModel.forward` / `generate`.

This is the one place that builds prompts: inference (`chat_batch`, `__call__`) and the training data
(`encode_training`, used by the SFT and preference datasets and the model-family interface) all go through it.
1. `prepare_chat_inputs`: each PIL image in a message becomes the marker `(<image>./</image>)`, the items of a
   content list are joined by newlines (as MiniCPM-V 2.6 `chat()` does), and the tokenizer's chat template renders
   the conversation.
2. `expand_image_placeholders`: each marker is replaced by that image's placeholder (image id + `<unk>` runs).
3. `encode`: tokenize, and find `image_bound`, the `[start, end)` ranges of `<unk>` positions that the resampler
   output overwrites.
4. `__call__` / `collate`: left padding, an attention mask from the real lengths (not `input_ids != 0`: id 0 is
   "!" in Qwen2) and position ids.

Slicing settings (`max_slice_nums`, `use_image_id`, ...) belong to the processor (its image processor's config,
from preprocessor_config.json, overridable when it is loaded: `MLLMProcessor.from_pretrained(dir,
max_slice_nums=1)`); the per-call overrides of the reference's processor call are accepted too.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image
from transformers import AutoProcessor, AutoTokenizer, PreTrainedTokenizerFast

from mllm.model.config import MiniCPMVConfig, MLLMConfig
from mllm.model.inputs import MLLMInputs, positions_from_mask
from mllm.model.loading import HUB_KWARGS
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


def pad_rows(
    sequences: list[torch.Tensor], pad_id: int, side: str = "left"
) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D id tensors -> (ids [B, T] padded with pad_id on `side`, attention mask [B, T] long from the real
    lengths). Generation pads on the left (every row's next token sits in the last column), training on the right."""
    if side not in ("left", "right"):
        raise ValueError(f"padding side must be 'left' or 'right', got {side!r}")
    length = max((len(s) for s in sequences), default=0)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)  # [B, T]
    mask = torch.zeros((len(sequences), length), dtype=torch.long)  # [B, T]
    for b, seq in enumerate(sequences):
        start = length - len(seq) if side == "left" else 0
        ids[b, start : start + len(seq)] = seq
        mask[b, start : start + len(seq)] = 1
    return ids, mask


def chat_pieces(tokenizer: Any, messages: list[dict[str, str]], where: str) -> list[tuple[str, bool]]:
    """Render a conversation with the chat template and cut it into (text, is_target) pieces.

    The target of an assistant turn is its content plus the closing `<|im_end|>`; the role header before it and
    the newline after it are context. Each cut is found by rendering the prefix of the conversation with the
    generation prompt, so that whatever template the tokenizer ships is honoured."""

    def render(msgs: list[dict[str, str]], gen: bool) -> str:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    end_text = "<|im_end|>"
    pieces: list[tuple[str, bool]] = []
    cursor = 0
    full = render(messages, False)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = render(messages[:i], True) if i else ""
        target = message["content"] + end_text
        if not full.startswith(prefix) or not full[len(prefix) :].startswith(target):
            raise ValueError(
                f"{where}: the chat template is not prefix-consistent at turn {i}, so answer tokens cannot be located"
            )
        pieces.append((prefix[cursor:], False))
        pieces.append((target, True))
        cursor = len(prefix) + len(target)
    pieces.append((full[cursor:], False))
    return [(text, is_target) for text, is_target in pieces if text]


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
        `load_tokenizer`). Keyword arguments override the slicing settings (e.g. `max_slice_nums=1`); the hub options
        that `AutoProcessor` passes along are dropped (a local directory needs none)."""
        overrides = {k: v for k, v in image_processor_overrides.items() if k not in HUB_KWARGS}
        tokenizer = load_tokenizer(model_dir)
        return cls(tokenizer, MLLMImageProcessor.from_pretrained(model_dir, **overrides))

    def save_pretrained(self, out_dir: str | Path) -> None:
        """Write the tokenizer files and preprocessor_config.json beside a saved model."""
        self.tokenizer.save_pretrained(str(out_dir))
        self.image_processor.save_pretrained(out_dir)

    @property
    def max_slice_nums(self) -> int:
        """Most grid slices per image (the image processor's setting)."""
        return self.image_processor.config.max_slice_nums

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

    def encode_training(
        self, messages: list[dict[str, str]], image_sizes: list[tuple[int, int]], where: str = "conversation"
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A whole conversation for training -> (input_ids [T] long, target mask [T] bool, image_bound [n, 2]).

        `messages` are text-only with one IMAGE_MARKER per image and `image_sizes` each image's (W, H), so that only
        image headers need to be read (the pixels come later, from `image_processor.preprocess_image`). The targets
        are the assistant turns' tokens and their closing `<|im_end|>` (`chat_pieces`); the prompt is the one
        `chat_batch` builds for inference. The one tokenization path of every training format (SFT, grounding,
        preference pairs)."""
        for i, message in enumerate(messages):
            check_control_tokens(message["content"], f"{where}: conversations[{i}].content")
        ids: list[int] = []
        targets: list[bool] = []
        image_idx = 0
        for text, is_target in chat_pieces(self.tokenizer, messages, where):
            chunks = text.split(IMAGE_MARKER)
            if image_idx + len(chunks) - 1 > len(image_sizes):
                raise ValueError(f"{where}: more image markers than the {len(image_sizes)} images given")
            expanded = [chunks[0]]
            for chunk in chunks[1:]:
                placeholder = self.image_processor.get_placeholder(image_sizes[image_idx], image_idx)
                expanded.extend([placeholder, chunk])
                image_idx += 1
            piece_ids = self.tokenizer.encode("".join(expanded), add_special_tokens=False)
            ids.extend(piece_ids)
            targets.extend([is_target] * len(piece_ids))
        input_ids = torch.tensor(ids, dtype=torch.long)  # [T]
        return input_ids, torch.tensor(targets, dtype=torch.bool), self.image_bound_from_ids(input_ids)

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

    def collate(self, encoded: list[dict[str, Any]], padding_side: str = "left") -> MLLMInputs:
        """Pad `encode` outputs into a batch (left for generation; right for training rows), image_bound shifted by
        each sample's left padding."""
        input_ids, attention_mask = pad_rows(
            [e["input_ids"] for e in encoded], self.pad_token_id, padding_side
        )
        pads = [input_ids.shape[1] - len(e["input_ids"]) if padding_side == "left" else 0 for e in encoded]
        return MLLMInputs(
            {
                "input_ids": input_ids,  # [B, T]
                "attention_mask": attention_mask,  # [B, T]
                "position_ids": positions_from_mask(attention_mask),  # [B, T]
                "image_bound": [e["image_bound"] + pad for e, pad in zip(encoded, pads)],
                "pixel_values": [e["pixel_values"] for e in encoded],
                "tgt_sizes": [e["tgt_sizes"] for e in encoded],
                "image_sizes": [e["image_sizes"] for e in encoded],
            }
        )

    def __call__(
        self,
        text: str | list[str],
        images: Image.Image | list[Image.Image] | list[list[Image.Image]] | None = None,
        max_length: int | None = None,
        do_pad: bool = True,
        max_slice_nums: int | None = None,
        use_image_id: bool | None = None,
        return_tensors: str | None = "pt",
        **kwargs: Any,
    ) -> MLLMInputs:
        """Prompts with image markers and their images -> a batch for `MLLMModel.forward(inputs)` / `generate`.

        The reference's call: `processor(prompt, [image, ...], return_tensors="pt")` for one prompt (a string and a
        flat list of its images, or one image), or `processor([prompt, ...], [[image, ...], ...])` for a batch (one
        list of images per prompt). `max_slice_nums` / `use_image_id` override the processor's own settings for
        this call. Tensors are always torch's: `return_tensors` may be "pt" or None; `do_pad` is accepted for the
        reference's signature (the token rows are always padded, slices never are)."""
        if kwargs:
            raise ValueError(f"MLLMProcessor: unknown arguments {sorted(kwargs)}")
        if return_tensors not in ("pt", None):
            raise ValueError(
                f"return_tensors={return_tensors!r}: this processor returns torch tensors ('pt')"
            )
        texts, images = _per_prompt(text, images)
        encoded = []
        for b, (prompt, sample_images) in enumerate(zip(texts, images)):
            if sample_images is not None and not isinstance(sample_images, (list, tuple)):
                raise ValueError(
                    f"images[{b}]: expected a list of images, got {type(sample_images).__name__}"
                )
            encoded.append(
                self.encode(prompt, sample_images, max_slice_nums, max_length, use_image_id, sample_idx=b)
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
        return self(
            texts, images, max_length=max_length, max_slice_nums=max_slice_nums, use_image_id=use_image_id
        )


def _per_prompt(text: Any, images: Any) -> tuple[list[str], list[list[Image.Image]]]:
    """The processor call's (text, images) as one prompt list and one image list per prompt: a single prompt takes
    a flat list of images (or one image), a list of prompts one list per prompt."""
    if isinstance(text, str):
        text = [text]
        if isinstance(images, Image.Image):
            images = [[images]]
        elif isinstance(images, (list, tuple)) and all(isinstance(i, Image.Image) for i in images):
            images = [list(images)]
    if not isinstance(text, (list, tuple)) or not all(isinstance(t, str) for t in text):
        raise ValueError(f"text: expected a prompt or a list of prompts, got {type(text).__name__}")
    if images is None:
        return list(text), [[] for _ in text]
    if len(text) == 1 and isinstance(images, (list, tuple)) and images and isinstance(images[0], Image.Image):
        images = [list(images)]  # one prompt with a flat list of its images
    if not isinstance(images, (list, tuple)) or len(images) != len(text):
        raise ValueError(
            f"images: expected one list of images per prompt ({len(text)} prompts), got {images!r:.80}"
        )
    return list(text), list(images)


class ModelProcessor(MLLMProcessor):
    """`MLLMProcessor` under the class name the exercise's checkpoints give in preprocessor_config.json
    (`processor_class`), so that `AutoProcessor` resolves such a directory to it without remote code."""


class MiniCPMVProcessor(MLLMProcessor):
    """`MLLMProcessor` under the official checkpoint's class name (see `ModelProcessor`)."""


def register_auto_processor() -> None:
    """Let `AutoProcessor.from_pretrained(model_dir)` load our processor for both model types (called when this
    module is imported; `mllm.model.modeling` registers the config and model classes likewise)."""
    AutoProcessor.register(MLLMConfig, ModelProcessor, exist_ok=True)
    AutoProcessor.register(MiniCPMVConfig, MiniCPMVProcessor, exist_ok=True)


register_auto_processor()
