"""MiniCPM-V 2.6 image slicing: one image -> the whole image resized plus a grid of high-resolution slices.

Each slice becomes a `[3, patch, n_patches * patch]` float32 strip (patches side by side, row-major), which is what
the NaViT vision tower consumes, and its size in patches `(h, w)` goes to `tgt_sizes`. The prompt gets one
placeholder per image whose `<unk>` runs are later overwritten by the resampler output, one run of
`image_feature_size` per slice.

The sizes must match the reference bit for bit (the vision tower sees the exact pixels), so the arithmetic keeps
the reference's quirks: Python `round` (banker's rounding), `int()` truncation and PIL bicubic resizing, with the
order of Pillow's two passes fixed (`resize_bicubic`) so that the pixels do not depend on the installed Pillow.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

logger = logging.getLogger(__name__)

PREPROCESSOR_CONFIG_NAME = "preprocessor_config.json"

# Keys of a checkpoint's preprocessor_config.json that describe the file itself, not the processing.
_IGNORED_CONFIG_KEYS = frozenset({"image_processor_type", "processor_class", "version", "auto_map"})


@dataclass
class ImageProcessorConfig:
    """Slicing, normalisation and placeholder settings (the keys of `preprocessor_config.json`)."""

    max_slice_nums: int = 9
    """Upper bound on the number of grid slices (the whole-image source slice is not counted)."""
    scale_resolution: int = 448
    """Target side of a square slice: each slice is resized to about scale_resolution**2 pixels."""
    patch_size: int = 14
    """Vision patch side in pixels; every slice side is a multiple of it."""
    image_feature_size: int = 64
    """Number of `<unk>` positions per slice in the prompt (the resampler's query count)."""
    use_image_id: bool = True
    """Prefix each image placeholder with `<image_id>i</image_id>`."""
    slice_mode: bool = True
    """Cut large images into a grid of slices; when False only the resized whole image is used."""
    norm_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    """Per-channel mean subtracted after scaling pixels to [0, 1]."""
    norm_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    """Per-channel standard deviation divided by after the mean."""
    im_start: str = "<image>"
    """Opening tag of the whole-image feature run."""
    im_end: str = "</image>"
    """Closing tag of the whole-image feature run."""
    slice_start: str = "<slice>"
    """Opening tag of a slice feature run."""
    slice_end: str = "</slice>"
    """Closing tag of a slice feature run."""
    unk: str = "<unk>"
    """Token repeated image_feature_size times as a stand-in for the visual features."""
    im_id_start: str = "<image_id>"
    """Opening tag of the image index prefix."""
    im_id_end: str = "</image_id>"
    """Closing tag of the image index prefix."""

    def __post_init__(self) -> None:
        for name in ("max_slice_nums", "scale_resolution", "patch_size", "image_feature_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(
                    f"image processor config field {name!r} must be a positive integer, got {value!r}"
                )
        for name in ("norm_mean", "norm_std"):
            value = tuple(float(v) for v in getattr(self, name))
            if len(value) != 3:
                raise ValueError(f"image processor config field {name!r} needs 3 values (RGB), got {value!r}")
            setattr(self, name, value)
        if any(s == 0 for s in self.norm_std):
            raise ValueError(
                f"image processor config field 'norm_std' must not contain 0, got {self.norm_std!r}"
            )

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<dict>") -> ImageProcessorConfig:
        """Build from a preprocessor_config.json mapping; unknown keys are reported, not silently dropped."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known - _IGNORED_CONFIG_KEYS)
        if unknown:
            logger.warning("%s: ignoring unknown image processor keys %s", source, unknown)
        return cls(**{k: v for k, v in data.items() if k in known})


def ensure_divide(length: float, patch_size: int) -> int:
    """Nearest multiple of `patch_size` (Python banker's `round`), at least one patch."""
    return max(round(length / patch_size) * patch_size, patch_size)


def find_best_resize(
    size: tuple[float, float], scale_resolution: int, patch_size: int, allow_upscale: bool = False
) -> tuple[int, int]:
    """Size (W, H) of about scale_resolution**2 pixels with the same aspect ratio, snapped to the patch grid.

    Images no larger than scale_resolution**2 keep their size (snapped) unless `allow_upscale`.
    """
    width, height = size
    if width * height > scale_resolution * scale_resolution or allow_upscale:
        ratio = width / height
        height = int(scale_resolution / math.sqrt(ratio))
        width = int(height * ratio)
    return ensure_divide(width, patch_size), ensure_divide(height, patch_size)


def get_refine_size(
    size: tuple[int, int],
    grid: tuple[int, int],
    scale_resolution: int,
    patch_size: int,
    allow_upscale: bool = False,
) -> tuple[int, int]:
    """Size (W, H) of the image to cut into `grid` (cols, rows) so that every cell is a best-resized slice."""
    width, height = size
    cols, rows = grid
    refine_width = ensure_divide(width, cols)
    refine_height = ensure_divide(height, rows)
    cell = find_best_resize(
        (refine_width / cols, refine_height / rows), scale_resolution, patch_size, allow_upscale=allow_upscale
    )
    return cell[0] * cols, cell[1] * rows


def best_grid(size: tuple[int, int], max_slice_nums: int, scale_resolution: int) -> tuple[int, int] | None:
    """The slice grid (cols, rows) whose aspect ratio is closest (in log) to the image's, or None for no slicing.

    The number of cells is tried around ceil(area / scale_resolution**2), capped at max_slice_nums; the first
    grid with the smallest error wins (strict `<`), as in the reference.
    """
    width, height = size
    multiple = min(math.ceil(width * height / (scale_resolution * scale_resolution)), max_slice_nums)
    if multiple <= 1:
        return None
    log_ratio = math.log(width / height)
    candidates = [n for n in (multiple - 1, multiple, multiple + 1) if n != 1 and n <= max_slice_nums]
    chosen: tuple[int, int] = (1, 1)
    min_error = math.inf
    for n in candidates:
        for cols in range(1, n + 1):
            if n % cols:
                continue
            error = abs(log_ratio - math.log(cols / (n // cols)))
            if error < min_error:
                chosen, min_error = (cols, n // cols), error
    return chosen


def split_grid(image: Image.Image, grid: tuple[int, int]) -> list[list[Image.Image]]:
    """Cut `image` into grid (cols, rows) equal cells; returns rows of cells, top to bottom, left to right."""
    width, height = image.size
    cell_w, cell_h = width // grid[0], height // grid[1]
    return [
        [image.crop((left, top, left + cell_w, top + cell_h)) for left in range(0, width, cell_w)]
        for top in range(0, height, cell_h)
    ]


def vertical_pass_first(size: tuple[int, int], target: tuple[int, int]) -> bool:
    """Whether Pillow 13 resamples rows before columns for this resize: when the height shrinks by more pixels than
    twice what the width shrinks by (Pillow 13.0's `ImagingResampleInner`; Pillow 12 always went columns first)."""
    shrink_w, shrink_h = size[0] - target[0], size[1] - target[1]
    return shrink_h > 0 and shrink_h > 2 * shrink_w


def resize_bicubic(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """`image.resize(size, BICUBIC)` as Pillow 13.0 computes it, on any Pillow from 10 on.

    Pillow resizes in two one-dimensional passes with a uint8 image between them, so the pass order changes pixel
    codes (by up to 17 on the fixture images: 2-9% of the codes of every resize whose height shrinks more than its
    width). Pillow 13 picks the order by the sizes; Pillow 12 (what gradio 6 allows) always starts with the columns.
    Running the two passes as two single-axis `resize` calls in Pillow 13's order gives its pixels exactly on both
    (tests/test_image_processing.py, against the reference made with Pillow 13). It is still Pillow's resampling.
    """
    if image.size == tuple(size):
        return image.copy()
    width, height = size
    if vertical_pass_first(image.size, size):
        middle = image.resize((image.width, height), Image.Resampling.BICUBIC)
    else:
        middle = image.resize((width, image.height), Image.Resampling.BICUBIC)
    return middle.resize((width, height), Image.Resampling.BICUBIC)


def to_rgb(image: Any, where: str) -> Image.Image:
    """The image as RGB (palette, grey and alpha images are converted); anything else is a ValueError."""
    if not isinstance(image, Image.Image):
        raise ValueError(f"{where}: expected a PIL.Image.Image, got {type(image).__name__}")
    return image if image.mode == "RGB" else image.convert("RGB")


class MLLMImageProcessor:
    """Slices images, turns slices into patch strips and builds the matching prompt placeholders."""

    def __init__(self, config: ImageProcessorConfig | None = None, **overrides: Any) -> None:
        base = asdict(config) if config is not None else {}
        base.update(overrides)
        self.config = ImageProcessorConfig(**base)

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, **overrides: Any) -> MLLMImageProcessor:
        """Load `preprocessor_config.json` from a checkpoint dir; defaults are used when the file is absent."""
        path = Path(model_dir) / PREPROCESSOR_CONFIG_NAME
        if not path.is_file():
            logger.info("%s not found; using default image processor settings", path)
            return cls(**overrides)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from exc
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
        data.update(overrides)
        return cls(ImageProcessorConfig.from_dict(data, source=str(path)))

    def save_pretrained(self, out_dir: str | Path) -> Path:
        """Write the settings as `preprocessor_config.json` so that from_pretrained restores them."""
        path = Path(out_dir) / PREPROCESSOR_CONFIG_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {"image_processor_type": "MLLMImageProcessor", **asdict(self.config)}
        data["norm_mean"], data["norm_std"] = list(self.config.norm_mean), list(self.config.norm_std)
        path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        return path

    def _max_slices(self, max_slice_nums: int | None) -> int:
        value = self.config.max_slice_nums if max_slice_nums is None else max_slice_nums
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"max_slice_nums must be a positive integer, got {value!r}")
        return value

    def get_sliced_grid(
        self, image_size: tuple[int, int], max_slice_nums: int | None = None
    ) -> tuple[int, int] | None:
        """Grid (cols, rows) for an image of size (W, H), or None when it is used whole."""
        if not self.config.slice_mode:
            return None
        return best_grid(image_size, self._max_slices(max_slice_nums), self.config.scale_resolution)

    def get_sliced_images(self, image: Image.Image, max_slice_nums: int | None = None) -> list[Image.Image]:
        """The resized whole image, then the grid cells row by row (all sides multiples of patch_size)."""
        cfg = self.config
        grid = self.get_sliced_grid(image.size, max_slice_nums)
        # The source is only upscaled when it is the sole view; next to a grid it stays at most 448**2.
        source_size = find_best_resize(
            image.size, cfg.scale_resolution, cfg.patch_size, allow_upscale=grid is None
        )
        slices = [resize_bicubic(image, source_size)]
        if grid is not None:
            refine_size = get_refine_size(
                image.size, grid, cfg.scale_resolution, cfg.patch_size, allow_upscale=True
            )
            refined = resize_bicubic(image, refine_size)
            slices.extend(cell for row in split_grid(refined, grid) for cell in row)
        return slices

    def to_patch_strip(self, image: Image.Image) -> tuple[torch.Tensor, tuple[int, int]]:
        """Normalised `[3, p, n_patches * p]` float32 strip (patches row-major) and the size in patches (h, w)."""
        p = self.config.patch_size
        width, height = image.size
        assert width % p == 0 and height % p == 0, f"slice {image.size} is not a multiple of patch {p}"
        h, w = height // p, width // p
        pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())  # [H, W, 3]
        x = pixels.permute(2, 0, 1).to(torch.float32) / 255  # [3, H, W]
        mean = torch.tensor(self.config.norm_mean, dtype=torch.float32).view(3, 1, 1)
        std = torch.tensor(self.config.norm_std, dtype=torch.float32).view(3, 1, 1)
        x = (x - mean) / std
        x = x.view(3, h, p, w, p).permute(0, 2, 1, 3, 4)  # [3, p(i), h, w, p(j)]
        return x.reshape(3, p, h * w * p).contiguous(), (h, w)  # [3, p, h*w*p]

    def preprocess_image(
        self, image: Image.Image, max_slice_nums: int | None = None, where: str = "image"
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """One image -> (strips [3, p, L] per slice, tgt_sizes [n_slices, 2] int32 as (h, w) patches)."""
        image = to_rgb(image, where)
        strips, sizes = [], []
        for piece in self.get_sliced_images(image, max_slice_nums):
            strip, hw = self.to_patch_strip(piece)
            strips.append(strip)
            sizes.append(hw)
        return strips, torch.tensor(sizes, dtype=torch.int32).view(-1, 2)

    def __call__(self, images: list[list[Image.Image]], max_slice_nums: int | None = None) -> dict[str, list]:
        """A batch of per-sample image lists -> pixel_values (per sample, all slices of all its images in order),
        tgt_sizes (per sample, [n, 2] int32) and image_sizes (per sample, the original (W, H) of each image)."""
        if not isinstance(images, (list, tuple)):
            raise ValueError(
                f"images: expected a list (per sample) of lists of images, got {type(images).__name__}"
            )
        pixel_values, tgt_sizes, image_sizes = [], [], []
        for b, sample in enumerate(images):
            if not isinstance(sample, (list, tuple)):
                raise ValueError(f"images[{b}]: expected a list of images, got {type(sample).__name__}")
            strips: list[torch.Tensor] = []
            sizes = [torch.zeros(0, 2, dtype=torch.int32)]
            for i, image in enumerate(sample):
                image_strips, image_tgt = self.preprocess_image(
                    image, max_slice_nums, where=f"images[{b}][{i}]"
                )
                strips.extend(image_strips)
                sizes.append(image_tgt)
            pixel_values.append(strips)
            tgt_sizes.append(torch.cat(sizes, dim=0))
            image_sizes.append([image.size for image in sample])
        return {"pixel_values": pixel_values, "tgt_sizes": tgt_sizes, "image_sizes": image_sizes}

    def get_placeholder(
        self,
        image_size: tuple[int, int],
        image_idx: int = 0,
        max_slice_nums: int | None = None,
        use_image_id: bool | None = None,
    ) -> str:
        """Prompt text for one image of size (W, H): optional image id, the whole-image run, then one slice run
        per grid cell (cells of a row concatenated, rows joined by newlines)."""
        cfg = self.config
        feature = cfg.unk * cfg.image_feature_size
        use_id = cfg.use_image_id if use_image_id is None else use_image_id
        text = f"{cfg.im_id_start}{image_idx}{cfg.im_id_end}" if use_id else ""
        text += cfg.im_start + feature + cfg.im_end
        grid = self.get_sliced_grid(image_size, max_slice_nums)
        if grid is not None:
            cols, rows = grid
            row_text = (cfg.slice_start + feature + cfg.slice_end) * cols
            text += "\n".join([row_text] * rows)
        return text
