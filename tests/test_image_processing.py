"""Image slicing parity with the reference fixture (part (a) of minicpmv26_tiny/README.md) and unit checks."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import PIL
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from mllm.processing.image_processing import (
    ImageProcessorConfig,
    MLLMImageProcessor,
    best_grid,
    ensure_divide,
    find_best_resize,
    resize_bicubic,
    vertical_pass_first,
)

KEYS = [
    f"img_{size}.{s}"
    for s in ("s9", "s1")
    for size in ("448x448", "1000x300", "300x1000", "1344x896", "90x60")
]


@pytest.fixture(scope="module")
def expected(tiny_model_dir):
    return json.loads((tiny_model_dir / "expected" / "expected.json").read_text())["image_processing"]


@pytest.fixture(scope="module")
def tensors(tiny_model_dir):
    return load_file(str(tiny_model_dir / "expected" / "image_processing.safetensors"))


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    return MLLMImageProcessor.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def outputs(processor, expected, tiny_model_dir):
    """Each stored image processed alone, as the reference did, once per key."""
    result = {}
    for key in KEYS:
        entry = expected[key]
        image = Image.open(tiny_model_dir / "images" / entry["image"])
        image.load()
        result[key] = (image, processor([[image]], max_slice_nums=entry["max_slice_nums"]))
    return result


def to_u8(strip: torch.Tensor) -> torch.Tensor:
    """Invert the 0.5/0.5 normalisation back to the uint8 code (exact for values that came from codes)."""
    return torch.round((strip.double() * 0.5 + 0.5) * 255).to(torch.uint8)


def test_config_loaded_from_file(processor):
    cfg = processor.config
    assert (cfg.max_slice_nums, cfg.scale_resolution, cfg.patch_size, cfg.image_feature_size) == (
        9,
        448,
        14,
        64,
    )
    assert cfg.use_image_id and cfg.slice_mode
    assert cfg.norm_mean == (0.5, 0.5, 0.5) and cfg.norm_std == (0.5, 0.5, 0.5)
    assert (cfg.im_start, cfg.slice_end, cfg.im_id_start, cfg.unk) == (
        "<image>",
        "</slice>",
        "<image_id>",
        "<unk>",
    )


@pytest.mark.parametrize("key", KEYS)
def test_geometry_and_placeholder(key, processor, expected, tensors, outputs):
    entry = expected[key]
    image, out = outputs[key]
    assert image.size == tuple(entry["image_size_wh"])
    grid = processor.get_sliced_grid(image.size, entry["max_slice_nums"])
    assert (list(grid) if grid else None) == entry["best_grid_cols_rows"]
    slices = processor.get_sliced_images(image, entry["max_slice_nums"])
    assert [list(s.size) for s in slices] == entry["slice_pixel_sizes_wh"]
    assert len(out["pixel_values"][0]) == entry["num_slices"]
    assert [list(x.shape) for x in out["pixel_values"][0]] == entry["pixel_values_shapes"]
    assert all(x.dtype == torch.float32 for x in out["pixel_values"][0])
    tgt = out["tgt_sizes"][0]
    assert tgt.dtype == torch.int32
    assert tgt.tolist() == entry["tgt_sizes_hw_patches"]
    assert torch.equal(tgt, tensors[f"imgproc.{key}.tgt_sizes"])
    assert out["image_sizes"] == [[image.size]]
    assert processor.get_placeholder(image.size, 0, entry["max_slice_nums"]) == entry["placeholder"]


@pytest.mark.parametrize("key", KEYS)
def test_pixels_exact(key, expected, tensors, outputs):
    entry = expected[key]
    strips = outputs[key][1]["pixel_values"][0]
    for j, (strip, stats) in enumerate(zip(strips, entry["slices"])):
        prefix = f"imgproc.{key}.slice{j}"
        u8 = to_u8(strip)
        # The float values are exactly the reference reconstruction of the codes.
        assert torch.equal(strip, (u8.to(torch.float32) / 255 - 0.5) / 0.5)
        assert hashlib.sha256(strip.numpy().tobytes()).hexdigest() == stats["sha256_float32"], (
            f"slice {j} differs from the reference (made with Pillow 13.0; installed {PIL.__version__})"
        )
        assert hashlib.sha256(u8.numpy().tobytes()).hexdigest() == stats["sha256_uint8"], j
        if f"{prefix}.pixel_u8" in tensors:
            assert torch.equal(u8, tensors[f"{prefix}.pixel_u8"])
        else:
            idx = tensors[f"{prefix}.sample_idx"]
            sampled = strip[idx[:, 0], idx[:, 1], idx[:, 2]]
            assert torch.equal(sampled, tensors[f"{prefix}.sample_val"])
        values = strip.double()
        assert values.sum().item() == pytest.approx(stats["sum"], rel=1e-9, abs=1e-6)
        assert values.std(unbiased=False).item() == pytest.approx(stats["std"], rel=1e-6)
        assert (values.min().item(), values.max().item()) == pytest.approx((stats["min"], stats["max"]))
    stored = tensors[f"imgproc.{key}.slice_stats"]
    assert stored.shape[0] == len(strips)


@pytest.mark.parametrize("size", ["448x448", "1000x300", "300x1000", "1344x896", "90x60"])
def test_s1_equals_s9_source_slice(size, outputs, expected):
    assert expected[f"img_{size}.s1"]["identical_to_s9_slice0"]
    s1 = outputs[f"img_{size}.s1"][1]["pixel_values"][0]
    s9 = outputs[f"img_{size}.s9"][1]["pixel_values"][0]
    assert len(s1) == 1 and torch.equal(s1[0], s9[0])


def test_patch_layout():
    """Element [c, i, n*14 + j] is pixel (row (n // w)*14 + i, col (n % w)*14 + j) of the slice."""
    rng = np.random.RandomState(0)
    array = rng.randint(0, 256, size=(28, 42, 3), dtype=np.uint8)
    strip, (h, w) = MLLMImageProcessor().to_patch_strip(Image.fromarray(array))
    assert (h, w) == (2, 3) and strip.shape == (3, 14, 6 * 14)
    u8 = to_u8(strip).numpy()
    for c, i, n, j in [(0, 0, 0, 0), (1, 5, 4, 13), (2, 13, 5, 7), (0, 9, 2, 3)]:
        assert u8[c, i, n * 14 + j] == array[(n // w) * 14 + i, (n % w) * 14 + j, c]


def test_rounding_and_grid_helpers():
    assert ensure_divide(245, 14) == 252  # 17.5 rounds to 18 (banker's: even)
    assert ensure_divide(35, 14) == 28  # 2.5 rounds to 2
    assert ensure_divide(3, 14) == 14  # at least one patch
    assert find_best_resize((90, 60), 448, 14) == (84, 56)  # small: no upscale unless asked
    assert find_best_resize((90, 60), 448, 14, allow_upscale=True) == (546, 364)
    assert best_grid((448, 448), 9, 448) is None
    assert best_grid((1344, 896), 9, 448) == (3, 2)
    assert best_grid((1344, 896), 1, 448) is None
    assert best_grid((4000, 100), 9, 448) == (3, 1)  # multiple 2: only 2 and 3 cells are candidates


def test_non_rgb_images_are_converted(tiny_model_dir):
    processor = MLLMImageProcessor()
    rgb = Image.open(tiny_model_dir / "images" / "img_90x60.png").convert("RGB")
    rgba = rgb.copy()
    rgba.putalpha(128)
    grey = rgb.convert("L")
    out = processor([[rgb, rgba, grey]])
    strips = out["pixel_values"][0]
    assert len(strips) == 3 and all(s.shape == (3, 14, 14196) for s in strips)
    assert torch.equal(strips[0], strips[1])  # alpha dropped
    assert torch.equal(strips[2][0], strips[2][1])  # grey replicated to 3 equal channels
    assert out["tgt_sizes"][0].tolist() == [[26, 39]] * 3


def test_batch_layout_and_empty_sample(tiny_model_dir):
    processor = MLLMImageProcessor()
    image = Image.open(tiny_model_dir / "images" / "img_1000x300.png")
    out = processor([[image, image], []])
    assert len(out["pixel_values"][0]) == 8 and out["pixel_values"][1] == []
    assert out["tgt_sizes"][0].shape == (8, 2) and out["tgt_sizes"][1].shape == (0, 2)
    assert out["tgt_sizes"][1].dtype == torch.int32
    assert out["image_sizes"] == [[(1000, 300), (1000, 300)], []]


def test_placeholder_options(tiny_model_dir):
    processor = MLLMImageProcessor()
    plain = "<image>" + "<unk>" * 64 + "</image>"
    assert processor.get_placeholder((448, 448), 3) == "<image_id>3</image_id>" + plain
    assert processor.get_placeholder((448, 448), 3, use_image_id=False) == plain
    row = ("<slice>" + "<unk>" * 64 + "</slice>") * 3
    assert processor.get_placeholder((1344, 896), 0, use_image_id=False) == plain + row + "\n" + row
    no_slices = MLLMImageProcessor(slice_mode=False)
    assert no_slices.get_placeholder((1344, 896), 0, use_image_id=False) == plain
    image = Image.open(tiny_model_dir / "images" / "img_1344x896.png")
    assert no_slices([[image]])["tgt_sizes"][0].tolist() == [[26, 39]]


def test_bad_input():
    processor = MLLMImageProcessor()
    with pytest.raises(ValueError, match=r"images\[0\]\[1\].*PIL"):
        processor([[Image.new("RGB", (20, 20)), np.zeros((20, 20, 3))]])
    with pytest.raises(ValueError, match=r"images\[0\]"):
        processor([Image.new("RGB", (20, 20))])
    with pytest.raises(ValueError, match="max_slice_nums"):
        processor([[Image.new("RGB", (20, 20))]], max_slice_nums=0)
    with pytest.raises(ValueError, match="patch_size"):
        ImageProcessorConfig(patch_size=0)
    with pytest.raises(ValueError, match="norm_std"):
        MLLMImageProcessor(norm_std=(0.5, 0.5))


def test_save_and_reload(tmp_path, tiny_model_dir):
    processor = MLLMImageProcessor(max_slice_nums=4, use_image_id=False)
    processor.save_pretrained(tmp_path)
    assert MLLMImageProcessor.from_pretrained(tmp_path).config == processor.config
    assert MLLMImageProcessor.from_pretrained(tmp_path / "missing").config == ImageProcessorConfig()
    (tmp_path / "preprocessor_config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="preprocessor_config.json"):
        MLLMImageProcessor.from_pretrained(tmp_path)


# sha256 of the 40 resizes below as Pillow 13.0.0's own `Image.resize(size, BICUBIC)` computes them (13 of them
# shrink the height by more than twice the width, so Pillow 13 runs its vertical pass first; Pillow 12.3's own
# resize gives d277fa47... for the same list).
PILLOW13_RESIZES_SHA256 = "00829f326d4efbe213c0c9682e857bd1ff668e87495992ed1f174252ce6162a4"


def test_resize_is_pillow13_whatever_pillow_is_installed():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (96, 80, 3), dtype=np.uint8))
    sizes = [(int(w), int(h)) for w, h in rng.integers(4, 200, (40, 2))]
    assert sum(vertical_pass_first(image.size, size) for size in sizes) == 13
    digest = hashlib.sha256()
    for size in sizes:
        out = resize_bicubic(image, size)
        assert out.size == size
        digest.update(np.asarray(out).tobytes())
        if int(PIL.__version__.split(".")[0]) == 13:  # the same pass order as Pillow 13's own resize
            assert out.tobytes() == image.resize(size, Image.Resampling.BICUBIC).tobytes(), size
    assert digest.hexdigest() == PILLOW13_RESIZES_SHA256


def test_vertical_pass_first_rule():
    assert vertical_pass_first((448, 448), (420, 126))  # height shrinks 322, width 28
    assert not vertical_pass_first((448, 448), (126, 420))
    assert not vertical_pass_first((100, 100), (100, 100))
    assert not vertical_pass_first((100, 100), (300, 300))  # upscaling: columns first
    assert vertical_pass_first((100, 100), (300, 50))  # the width grows, the height shrinks
    assert not vertical_pass_first((100, 100), (80, 60))  # 40 is not more than 2 * 20
