"""Atomic writes (mllm/files.py): a failed write leaves the previous file whole and no temporary file behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mllm.files import write_json_atomic, write_text_atomic


def test_write_json_atomic_writes_creates_folders_and_replaces(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "result.json"
    write_json_atomic(path, {"CHAIRi": 12.5, "name": "café"})
    assert json.loads(path.read_text(encoding="utf-8")) == {"CHAIRi": 12.5, "name": "café"}
    assert path.read_text(encoding="utf-8").endswith("\n")
    write_json_atomic(path, [1, 2], indent=None)
    assert path.read_text(encoding="utf-8") == "[1, 2]\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["result.json"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "result.json"
    write_text_atomic(path, "old\n")
    with pytest.raises(TypeError):
        write_json_atomic(path, {"not json": object()})
    assert path.read_text(encoding="utf-8") == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_an_interrupted_replace_removes_the_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "answers.json"
    write_text_atomic(path, "old\n")

    def fail(src, dst):
        assert Path(src).read_text(encoding="utf-8") == "new\n"  # the whole new text was written first
        raise OSError("disk full")

    monkeypatch.setattr("mllm.io.os.replace", fail)
    with pytest.raises(OSError, match="disk full"):
        write_text_atomic(path, "new\n")
    assert path.read_text(encoding="utf-8") == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["answers.json"]
