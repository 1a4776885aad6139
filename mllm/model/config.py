"""`MLLMConfig`: one config for the whole MiniCPM-V 2.6-style model.

The language-model fields sit flat at the top level (Qwen2 style), exactly as in real config.json files of this family
(`model_type` "mllm" from the exercise template or "minicpmv" from the official release). The vision tower's settings
live in the `vision_config` dict (as in the file); `MLLMConfig.vision` gives a typed view of it with SigLIP defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from transformers import AutoConfig, PretrainedConfig

from mllm.model.presets import preset_fields
from mllm.model.registry import PATCH_STEM, RESAMPLER, projector_class, stem_class

MODEL_TYPES = ("mllm", "minicpmv")


@dataclass
class VisionConfig:
    """Typed view of `vision_config` (SigLIP NaViT). Defaults are SigLIP's where the file leaves a field out."""

    hidden_size: int = 1152
    """Width of the vision transformer."""
    intermediate_size: int = 4304
    """Hidden width of each block's MLP."""
    num_attention_heads: int = 16
    """Attention heads per block (head_dim = hidden_size / heads)."""
    num_hidden_layers: int = 27
    """Layers in the checkpoint's config; the last is not built when `drop_vision_last_layer` is true."""
    patch_size: int = 14
    """Side of a square patch in pixels."""
    image_size: int = 980
    """The position table covers (image_size / patch_size)^2 positions (70x70 for 980/14)."""
    num_channels: int = 3
    """Input image channels."""
    hidden_act: str = "gelu_pytorch_tanh"
    """MLP activation."""
    layer_norm_eps: float = 1e-6
    """LayerNorm epsilon of every norm in the tower."""
    attention_dropout: float = 0.0
    """Dropout on attention probabilities (training only)."""
    stem: str = "patch"
    """How pixels become patch tokens (a name in `mllm.model.registry`). "patch" (SigLIP, every real checkpoint):
    one linear patch_size x patch_size convolution. "conv" (an option for small models trained from scratch): a
    stride-2 3x3 convolution, then `stem_layers - 1` stride-1 3x3 convolutions (each with GroupNorm and GELU), then
    the patch convolution of side patch_size / 2; it lets a tiny tower see where an edge lies inside a patch. "cnn"
    (another option for tiny models trained from scratch): a small CNN over each slice's whole image (`stem_layers`
    stride-2 3x3 convolutions, channels doubling from `stem_channels`), then the patch convolution of side
    patch_size / 2**stem_layers, so every token already sees the shape around it across patch borders; needs
    patch_size divisible by 2**stem_layers (8 with 3 layers). "conv" and "cnn" live in `mllm.toy.stems`."""
    stem_channels: int = 32
    """Channels of the first 3x3 convolution of the "conv"/"cnn" stems (unused by "patch")."""
    stem_layers: int = 2
    """Number of 3x3 convolutions in the "conv"/"cnn" stems (unused by "patch")."""
    position_init_std: float | None = None
    """Std of the learned position table when a model is initialised from scratch (None: `initializer_range`, 0.02).
    Only matters for training from scratch: a tiny tower found object positions sooner with 0.5, where the patch
    features start at about that scale (loading a checkpoint overwrites the table anyway)."""

    @property
    def num_patches_per_side(self) -> int:
        """Side of the square position-embedding grid (70 for the real model)."""
        return self.image_size // self.patch_size

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> VisionConfig:
        """Keep only the fields we use; other SigLIP keys in the file (model_type, ...) stay in the raw dict."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in (data or {}).items() if k in known})


_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "int": (int,),
    "float": (int, float),
    "bool": (bool,),
    "str": (str,),
    "dict": (dict,),
    "list": (list,),
}


def _type_ok(value: Any, annotation: str) -> bool:
    """Whether a JSON value fits a simple string annotation such as "int | None" or "list[str] | None"."""
    for name in (part.strip().split("[")[0] for part in annotation.split("|")):
        if name == "None" and value is None:
            return True
        allowed = _JSON_TYPES.get(name)
        if allowed is None:
            return True  # not a simple type: not checked here
        if isinstance(value, allowed) and (name == "bool" or not isinstance(value, bool)):
            return True
    return False


def check_config_fields(data: dict[str, Any], source: str) -> None:
    """Every field of config.json (and of its vision_config) that the model reads has the JSON type its annotation
    says (ints are not strings, flags are booleans); the ValueError names the file and the field."""
    checks = [(data, MLLMConfig.__annotations__, "")]
    if isinstance(data.get("vision_config"), dict):
        checks.append((data["vision_config"], VisionConfig.__annotations__, "vision_config."))
    for values, hints, prefix in checks:
        for name, annotation in hints.items():
            if name in values and isinstance(annotation, str) and not _type_ok(values[name], annotation):
                raise ValueError(
                    f"{source}: field '{prefix}{name}' must be {annotation}, got {values[name]!r} "
                    f"({type(values[name]).__name__})"
                )


class MLLMConfig(PretrainedConfig):
    """Configuration of `MLLMModel`: Qwen2-family LLM fields + vision tower + resampler + slicing settings."""

    model_type = "mllm"

    # --- language model (Qwen2 / Llama family) ---
    vocab_size: int = 151666
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int | None = 4
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    attention_bias: bool = True
    attention_dropout: float = 0.0
    tie_word_embeddings: bool = False
    use_cache: bool = True
    use_sliding_window: bool = False
    sliding_window: int | None = None
    max_window_layers: int = 28
    layer_types: list[str] | None = None
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    # --- vision tower, resampler and image slicing ---
    vision_config: dict | None = None
    slice_config: dict | None = None
    query_num: int = 64
    image_size: int = 448
    patch_size: int = 14
    use_image_id: bool = True
    drop_vision_last_layer: bool = True
    batch_vision_input: bool = True
    vision_batch_size: int = 16
    slice_mode: bool = True
    version: float | str | None = None
    projector: str = "resampler"
    """Vision tokens -> LLM rows: "resampler" (MiniCPM-V's perceiver, every real checkpoint), or for tiny models
    trained from scratch (`mllm.toy.projectors`) "merge" (a 2x2 patch merge) or "mlp" (each token on its own)."""
    normalize_image_rows: bool = False
    """Normalise each slice's query rows after the projector: subtract their mean over the rows and divide by their
    RMS (real checkpoints: false). For tiny models trained from scratch: without it the rows of the toy demo grew
    to ~100x the text embeddings' scale and became nearly the same for every image (docs/LOG.md)."""

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // max(self.num_attention_heads, 1)
        # Sliding window is off in every model of this family: the file's `sliding_window` is then meaningless, and
        # transformers' caches would otherwise read it as "every layer slides".
        if not self.use_sliding_window:
            self.sliding_window = None
        if self.layer_types is None:
            self.layer_types = ["full_attention"] * self.num_hidden_layers
        self.vision_config = dict(self.vision_config or {})
        self.slice_config = dict(self.slice_config or {})
        kwargs.pop("rope_scaling", None)
        super().__post_init__(**kwargs)
        self.validate_fields()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> MLLMConfig:
        """Read config.json of either model_type, as the class of that type, so that saving keeps it. (transformers'
        own reader, seeing a model_type other than the class's, would pick the nested `slice_config` dict because it
        carries a model_type too.)"""
        config_dict, kwargs = cls.get_config_dict(pretrained_model_name_or_path, **kwargs)
        check_config_fields(config_dict, f"{pretrained_model_name_or_path}/config.json")
        model_type = config_dict.pop("model_type", cls.model_type)
        if model_type not in MODEL_TYPES:
            raise ValueError(
                f"{pretrained_model_name_or_path}: config.json has model_type {model_type!r}, expected one of {MODEL_TYPES}"
            )
        config_class = MiniCPMVConfig if model_type == MiniCPMVConfig.model_type else MLLMConfig
        return config_class.from_dict(config_dict, **kwargs)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> MLLMConfig:
        """A config of a named size (`mllm.model.presets.PRESETS`: "minicpmv-2.6", "toy", "bench-tiny",
        "tiny-llm"), `overrides` on top (`vision_config` merged key by key), litgpt's `Config.from_name`."""
        return cls(**preset_fields(name, **overrides))

    @property
    def vision(self) -> VisionConfig:
        """Typed view of `vision_config` with SigLIP defaults filled in."""
        return VisionConfig.from_dict(self.vision_config)

    @property
    def num_vision_layers(self) -> int:
        """Encoder layers actually built: the checkpoint never holds the dropped last layer."""
        return self.vision.num_hidden_layers - (1 if self.drop_vision_last_layer else 0)

    def validate_fields(self) -> None:
        """Fail early, naming the field, rather than deep inside a matmul."""
        for name in (
            "hidden_size",
            "num_attention_heads",
            "num_hidden_layers",
            "vocab_size",
            "intermediate_size",
        ):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"MLLMConfig.{name} must be positive, got {getattr(self, name)!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"MLLMConfig.num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(
                f"MLLMConfig.layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers"
            )
        if self.query_num <= 0:
            raise ValueError(f"MLLMConfig.query_num must be positive, got {self.query_num}")
        if self.vision_batch_size <= 0:
            raise ValueError(f"MLLMConfig.vision_batch_size must be positive, got {self.vision_batch_size}")
        if self.projector != RESAMPLER:
            projector_class(self.projector)  # a ValueError naming the field and the known names
        vision = self.vision
        if vision.stem != PATCH_STEM:
            stem_class(vision.stem).check_config(vision)
        if vision.hidden_size % vision.num_attention_heads:
            raise ValueError(
                f"MLLMConfig.vision_config.hidden_size ({vision.hidden_size}) must be a multiple of "
                f"num_attention_heads ({vision.num_attention_heads})"
            )


class MiniCPMVConfig(MLLMConfig):
    """The same config under the official checkpoint's `model_type`, so `AutoConfig` reads both spellings."""

    model_type = "minicpmv"


def register_auto_config() -> None:
    """Make `AutoConfig.from_pretrained` understand "mllm" and "minicpmv" (called when this module is imported)."""
    for config_class in (MLLMConfig, MiniCPMVConfig):
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)


register_auto_config()
