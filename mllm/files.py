"""Atomic file writes: a reader, or a re-run after a kill, never sees half a file.

Every long job writes its results through these (answers' metadata, CHAIR results, demo markers, prepared data).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` to a temporary file beside `path`, then rename it over `path` (atomic on one filesystem)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())  # on disk before the rename makes it visible
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(path: str | os.PathLike, payload: Any, indent: int | None = 2) -> None:
    """`payload` as JSON (UTF-8, trailing newline), written atomically."""
    write_text_atomic(path, json.dumps(payload, indent=indent, ensure_ascii=False) + "\n")
