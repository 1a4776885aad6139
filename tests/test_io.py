"""`mllm.io`: the resumable JSONL output (fingerprint, --overwrite, lock, torn tails, parts, errors once), JSON
reading that names the file and line, and image decoding with the pixel cap."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from mllm.io import (
    RecordError,
    ResumableJsonl,
    image_source,
    iter_jsonl,
    open_image,
    read_json,
    repair_torn_tail,
)


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_fingerprint_resume_refusal_and_overwrite(tmp_path):
    out = tmp_path / "out.jsonl"
    with ResumableJsonl(out, {"data": "a", "model": {"dir": "/x", "sha": 1}}) as output:
        output.append([{"idx": 0, "v": "a0"}, {"idx": 1, "v": "a1"}])
    assert json.loads((tmp_path / "out.fingerprint.json").read_text())["data"] == "a"
    # The same computation from a model directory at another path resumes.
    with ResumableJsonl(out, {"data": "a", "model": {"dir": "/elsewhere", "sha": 1}}) as output:
        assert output.done == {0, 1}
    with pytest.raises(ValueError, match=r"other inputs or settings \(differing: data;"):
        ResumableJsonl(out, {"data": "b", "model": {"dir": "/x", "sha": 1}}).__enter__()
    assert [r["v"] for r in records(out)] == ["a0", "a1"]
    with ResumableJsonl(out, {"data": "b"}, overwrite=True) as output:
        assert output.done == set()
        output.append([{"idx": 0, "v": "b0"}])
    assert records(out) == [{"idx": 0, "v": "b0"}]
    # An output without a fingerprint (an older tool's) is not appended to.
    (tmp_path / "out.fingerprint.json").unlink()
    with pytest.raises(ValueError, match="holds records but no out.fingerprint.json"):
        ResumableJsonl(out, {"data": "b"}).__enter__()


def test_an_emptied_output_takes_a_new_fingerprint_and_drops_old_errors(tmp_path):
    """A kill after --overwrite emptied the files but before the new fingerprint was written leaves no records:
    the next run starts afresh without --overwrite."""
    out = tmp_path / "out.jsonl"
    with ResumableJsonl(out, {"data": "a"}) as output:
        output.error(3, "bad", source="q.jsonl", line=4, field="image")
    out.write_text("")
    with ResumableJsonl(out, {"data": "b"}) as output:
        assert output.done == set() and output.error_keys == set()
    assert not (tmp_path / "out.errors.jsonl").read_text()


def test_torn_tail_is_truncated_in_place_and_errors_are_written_once(tmp_path):
    out = tmp_path / "out.jsonl"
    with ResumableJsonl(out, {"k": 1}) as output:
        output.append([{"idx": 0}])
        assert output.error(5, "broken image", source="q.jsonl", line=6, field="image")
    inode = out.stat().st_ino
    with out.open("a") as handle:
        handle.write('{"idx": 1, "ans')
    with ResumableJsonl(out, {"k": 1}) as output:
        assert output.done == {0}
        assert not output.error(5, "broken image", source="q.jsonl", line=6, field="image")
        output.append([{"idx": 1}])
    assert out.stat().st_ino == inode  # repaired in place, not rewritten
    assert records(out) == [{"idx": 0}, {"idx": 1}]
    (error,) = records(tmp_path / "out.errors.jsonl")
    assert error == {"idx": 5, "file": "q.jsonl", "line": 6, "field": "image", "error": "broken image"}
    assert repair_torn_tail(out) == 0 and repair_torn_tail(tmp_path / "missing.jsonl") == 0
    out.write_text('{"idx": 0}\nnot json\n{"idx": 2}\n')
    with pytest.raises(ValueError, match="out.jsonl, line 2: not a record of this output"):
        ResumableJsonl(out, {"k": 1}).__enter__()


def test_lock_names_the_holder_and_is_released(tmp_path):
    out = tmp_path / "out.jsonl"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from mllm.io import ResumableJsonl\n"
            "with ResumableJsonl(sys.argv[1], {}):\n    print('locked', flush=True); time.sleep(60)",
            str(out),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ValueError, match=f"in use by another run \\(pid {holder.pid}"):
            ResumableJsonl(out, {}).__enter__()
    finally:
        holder.kill()
        holder.wait()
    with ResumableJsonl(out, {}):  # a killed holder's lock dies with it
        assert (tmp_path / "out.lock").read_text().strip() == str(os.getpid())
    assert not (tmp_path / "out.lock").exists()


def test_parts_count_as_done_and_merge_once(tmp_path):
    out = tmp_path / "out.jsonl"
    for rank in (1, 0):  # rank 1 first: without a barrier it records the fingerprint itself
        with ResumableJsonl(out, {"k": 1}, rank=rank, world_size=2) as output:
            output.append([{"idx": rank}, {"idx": rank + 2}])
    with (tmp_path / "out.part1.jsonl").open("a") as handle:
        handle.write('{"idx": 5, "a')  # torn by a killed rank
    with ResumableJsonl(out, {"k": 1}) as output:
        assert output.done == {0, 1, 2, 3}
        assert output.merge_parts() == 4
        assert output.merge_parts() == 0
    assert sorted(r["idx"] for r in records(out)) == [0, 1, 2, 3]
    assert not list(tmp_path.glob("out.part*"))


def test_reading_names_file_and_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("{nope")
    with pytest.raises(ValueError, match="--data .*bad.json: not valid JSON"):
        read_json(path, "--data")
    jsonl = tmp_path / "q.jsonl"
    jsonl.write_bytes(b'{"a": 1}\n\n\xff\xfe\n[1]\n')
    found = list(iter_jsonl(jsonl))
    assert found[0] == (0, {"a": 1}) and found[1] == (1, None) and found[3] == (3, [1])
    assert isinstance(found[2][1], RecordError) and "not UTF-8" in str(found[2][1])


def test_images_within_the_cap(tmp_path):
    path = tmp_path / "img.png"
    Image.new("RGB", (30, 20), "blue").save(path)
    assert open_image(path, "img", max_pixels=600).size == (30, 20)
    with pytest.raises(RecordError, match="30x20 = 600 pixels is over the cap of 599"):
        open_image(path, "img", max_pixels=599)
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(RecordError, match="not a readable image"):
        open_image(tmp_path / "text.png", "text")
    assert image_source("img.png", tmp_path) == path
    with pytest.raises(RecordError, match="file not found"):
        image_source("nope.png", tmp_path)
