"""Box text convention: formatting, parsing of the three syntaxes, garbage, IoU."""

from __future__ import annotations

import pytest

from mllm.boxes import (
    format_box,
    format_boxes,
    iou,
    normalize_box,
    parse_box,
    qwen25vl_frame,
    to_pixels,
    wrap_ref,
)


def test_format_box_grid_and_rounding():
    assert format_box([0, 0, 640, 480], 640, 480) == "[0, 0, 1000, 1000]"
    # 100/640*1000 = 156.25 -> 156; 50/480*1000 = 104.17 -> 104; 333/640*1000 = 520.3 -> 520; 479/480 -> 998
    assert format_box([100, 50, 333, 479], 640, 480) == "[156, 104, 520, 998]"
    assert normalize_box([-5, 10, 700, 480], 640, 480) == (0, 21, 1000, 1000)  # clamped to the grid


def test_round_trip_within_half_a_grid_step():
    width, height = 617, 389
    box = (12.3, 45.6, 501.2, 388.0)
    back = to_pixels(parse_box(format_box(box, width, height)), width, height)
    for v, w, s in zip(back, box, (width, height, width, height)):
        assert abs(v - w) <= s / 2000 + 1e-9


def test_round_trip_qwen_and_shikra_syntaxes():
    width, height = 800, 600
    box = (80, 60, 400, 300)
    qwen = format_box(box, width, height, "qwen")
    assert qwen == "<box>(100,100),(500,500)</box>"  # round(0.1*999)=100, round(0.5*999)=500
    assert to_pixels(parse_box(qwen, "qwen"), width, height) == pytest.approx(
        (100 / 999 * 800, 100 / 999 * 600, 500 / 999 * 800, 500 / 999 * 600)
    )
    shikra = format_box(box, width, height, "shikra")
    assert shikra == "[0.100,0.100,0.500,0.500]"
    assert to_pixels(parse_box(shikra, "shikra"), width, height) == pytest.approx(box)
    assert parse_box(shikra) == pytest.approx((100, 100, 500, 500))  # auto recognises 0..1 floats


def test_format_several_boxes():
    boxes = [(0, 0, 50, 50), (50, 50, 100, 100)]
    assert format_boxes(boxes, 100, 100) == "[0, 0, 500, 500], [500, 500, 1000, 1000]"
    assert format_boxes(boxes, 100, 100, "shikra") == "[0.000,0.000,0.500,0.500;0.500,0.500,1.000,1.000]"
    assert parse_box(format_boxes(boxes, 100, 100, "shikra"), "shikra") == (0, 0, 500, 500)


def test_parse_mllm_with_spaces_swapped_corners_and_surrounding_text():
    assert parse_box("The man is at [ 10 ,20,  300 , 400 ] in the image.") == (10, 20, 300, 400)
    assert parse_box("[300, 400, 10, 20]") == (10, 20, 300, 400)
    assert parse_box("first [1, 2, 3, 4] then [5, 6, 7, 8]") == (1, 2, 3, 4)
    assert parse_box("[0, 0, 1, 1]") == (0, 0, 1, 1)  # integers stay on the 0..1000 grid in auto mode
    assert parse_box("[10, 20, 1200, 400]") == (10, 20, 1000, 400)  # clamped


def test_parse_qwen_syntax():
    text = "<ref>the dog</ref><box>( 999 , 0 ),(0,999)</box>"
    assert parse_box(text) == pytest.approx((0, 0, 1000, 1000))
    assert parse_box(text, "qwen") == pytest.approx((0, 0, 1000, 1000))
    assert parse_box("<box>(100,200),(300,400)</box>", "qwen") == pytest.approx(
        (100 / 999 * 1000, 200 / 999 * 1000, 300 / 999 * 1000, 400 / 999 * 1000)
    )
    assert parse_box("[1, 2, 3, 4]", "qwen") is None  # told the syntax: brackets are not Qwen's


def test_parse_shikra_scale_when_told():
    assert parse_box("[0.1,0.2,0.3,0.4]", "shikra") == pytest.approx((100, 200, 300, 400))
    assert parse_box("[0.1,0.2,0.3,0.4]", "mllm") == pytest.approx((0.1, 0.2, 0.3, 0.4))


@pytest.mark.parametrize(
    "garbage",
    [
        "",
        "no box here",
        "[1, 2, 3]",
        "[a, b, c, d]",
        "<box>(1,2)</box>",
        "[1, 2, 3, 4",
        None,
        42,
        "[[[",
        "1,2,3,4",
    ],
)
def test_parse_garbage_gives_none(garbage):
    assert parse_box(garbage) is None


def test_parse_unknown_format_is_a_caller_error():
    with pytest.raises(ValueError, match="box format"):
        parse_box("[1, 2, 3, 4]", "yolo")


def test_iou_hand_cases():
    assert iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0
    assert iou((0, 0, 10, 10), (10, 0, 20, 10)) == 0.0  # touching edges
    assert iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert iou((0, 0, 10, 10), (2, 2, 4, 4)) == pytest.approx(4 / 100)
    assert iou((0, 0, 0, 0), (0, 0, 0, 0)) == 0.0  # empty union


def test_wrap_ref():
    assert wrap_ref("the red car") == "<ref>the red car</ref>"


def test_bad_size_raises():
    with pytest.raises(ValueError, match="width"):
        format_box([0, 0, 1, 1], 0, 10)


def test_other_families_syntaxes_round_trip():
    width, height = 800, 600
    box = (80, 60, 400, 300)
    llava = format_box(box, width, height, "llava")
    assert llava == "[0.10, 0.10, 0.50, 0.50]"
    assert to_pixels(parse_box(llava, "llava"), width, height) == pytest.approx(box)
    assert parse_box(llava) == pytest.approx((100, 100, 500, 500))  # auto: 0..1 floats
    qwen2vl = format_box(box, width, height, "qwen2vl")
    assert qwen2vl == "<|box_start|>(100,100),(500,500)<|box_end|>"  # 0..1000, divided by 1000
    for fmt in ("qwen2vl", "auto"):
        assert to_pixels(
            parse_box(f"<|object_ref_start|>a cup<|object_ref_end|>{qwen2vl}", fmt), width, height
        ) == (pytest.approx(box))


def test_qwen25vl_writes_pixels_of_the_resized_frame():
    # smart_resize (factor 28): 800x600 -> 812x588 (round to multiples of 28, inside the pixel budget)
    assert qwen25vl_frame(800, 600) == (812, 588)
    box = (80, 60, 400, 300)
    text = format_box(box, 800, 600, "qwen25vl")
    assert text == "<|box_start|>(81,59),(406,294)<|box_end|>"  # 0.1*812=81.2, 0.1*588=58.8, 0.5*812, 0.5*588
    assert to_pixels(parse_box(text, "qwen25vl", (800, 600)), 800, 600) == pytest.approx(box, abs=1.0)
    json_answer = '```json\n[{"bbox_2d": [406, 294, 81, 59], "label": "cup"}]\n```'  # corners swapped
    assert parse_box(json_answer, "qwen25vl", (800, 600)) == parse_box(text, "qwen25vl", (800, 600))
    with pytest.raises(ValueError, match="image size"):
        parse_box(text, "qwen25vl")
    assert parse_box("no box", "qwen25vl", (800, 600)) is None


def test_wrap_ref_for_qwen2vl_families():
    assert wrap_ref("the cup", "qwen2vl") == "<|object_ref_start|>the cup<|object_ref_end|>"
    assert wrap_ref("the cup", "qwen25vl") == "<|object_ref_start|>the cup<|object_ref_end|>"
    assert wrap_ref("the cup", "llava") == "<ref>the cup</ref>"


def test_snap_box_moves_coordinates_to_bins_and_keeps_a_side():
    from mllm.boxes import snap_box

    assert snap_box([12, 33, 61, 88], 100, 100, 20) == [10, 35, 60, 90]
    assert normalize_box(snap_box([12, 33, 61, 88], 112, 100, 20), 112, 100) == (100, 350, 550, 900)
    assert snap_box([10, 10, 12, 12], 100, 100, 10) == [10, 10, 20, 20]  # collapsed: one step kept
    assert snap_box([99, 99, 100, 100], 100, 100, 10) == [90, 90, 100, 100]  # ... inside the image
    with pytest.raises(ValueError, match="bins must be at least 1"):
        snap_box([0, 0, 1, 1], 10, 10, 0)
