"""Files at the bottom of the stack: atomic writes, JSON(L) reading with errors that name the file and line,
image decoding with a pixel cap, fingerprints, and one resumable JSONL output.

`ResumableJsonl` is what every long job that writes one line per input record uses (`mllm answer`, `mllm eval-vqa`,
`mllm eval grounding`, `mllm logp`):

    with ResumableJsonl(out, fingerprint, overwrite=args.overwrite) as output:
        for batch in batches:                      # items whose key is in output.done are skipped
            output.append(records)                 # whole lines, flushed and synced per batch
            output.error(key, "bad image", line=7, field="image", source=questions)   # once per record

Guarantees:
- **Fingerprint.** `<stem>.fingerprint.json` beside the output records what made it (inputs, model, tokenizer,
  decoding settings). A run with another fingerprint is refused (the message lists the differing keys) while the
  output holds records; `overwrite=True` empties the output, its parts and its errors in place first (truncation, one
  system call each) and then records the new fingerprint, so a kill at any point leaves either the old records with
  their fingerprint or no records.
- **Lock.** An exclusive `flock` on `<stem>.lock` (which holds the owner's pid) for the whole run: a second run on
  the same output is refused, naming the pid of the first.
- **Torn tail.** A last line without its newline (a kill in the middle of a write) is cut off by truncating the file
  in place (`os.truncate`, one system call: a kill cannot leave the file shorter than its complete lines). Files are
  never rewritten to repair them.
- **Parts.** In a data-parallel run (`rank`, `world_size`), rank r writes `<stem>.part<r>.jsonl` under its own lock;
  keys in any part count as done (whatever the world size of the run that wrote them), and `merge_parts` appends
  the parts' new lines to the output, syncs it, then deletes the parts.
- **Errors.** `<stem>.errors.jsonl` gets one line per failed record (its key, `file`, `line`, `field`, `error`), once:
  a re-run that meets the same bad record again does not add a second line.
"""

from __future__ import annotations

import base64
import binascii
import errno
import fcntl
import hashlib
import io
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from PIL import Image

logger = logging.getLogger(__name__)

# -- atomic writes ---------------------------------------------------------------------------------------------------


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


def write_jsonl_atomic(path: str | os.PathLike, records: Iterable[Any]) -> None:
    """One JSON value per line, written atomically."""
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


# -- reading ---------------------------------------------------------------------------------------------------------


class RecordError(ValueError):
    """One input record is unusable (a bad image, a missing field, a prompt over the model's length...): the job
    records it with its file, line and field and goes on. Any other exception stops the job."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class ImageTooLargeError(RecordError):
    """A RecordError for an image refused for its size (over the pixel cap, or a decompression bomb), so that a
    server can answer it with 413 and an unreadable image with 400."""


def read_json(path: str | os.PathLike, flag: str | None = None) -> Any:
    """A JSON file; a missing, undecodable or invalid file is a ValueError naming it (and the flag it came from)."""
    path = Path(path)
    where = f"{flag} {path}" if flag else str(path)
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError as exc:
        raise ValueError(f"{where}: file not found") from exc
    except UnicodeDecodeError as exc:
        raise ValueError(f"{where}: not UTF-8 text ({exc})") from exc
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where}: not valid JSON ({exc})") from exc


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    """(0-based index, record) for every line of a JSONL file, blank lines included as None. A line that is not
    UTF-8 or not JSON comes as a RecordError instance instead of the record, so one bad line never stops a job."""
    with open(path, "rb") as handle:
        for index, raw in enumerate(handle):
            if not raw.strip():
                yield index, None
                continue
            try:
                yield index, json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as exc:
                yield index, RecordError(f"not UTF-8 text ({exc})")
            except json.JSONDecodeError as exc:
                yield index, RecordError(f"not valid JSON ({exc})")


def run_isolated(
    fn: Callable[[list[Any]], Any], batch: list[Any], on_error: Callable[[Any, RecordError], None]
) -> list[tuple[list[Any], Any]]:
    """`[(batch, fn(batch))]`; when `fn` fails on a bad record (a RecordError), the batch is run again one item at a
    time: the bad items go to `on_error(item, error)` and the others come back as `([item], fn([item]))`."""
    try:
        return [(batch, fn(batch))]
    except RecordError as exc:
        if len(batch) == 1:
            on_error(batch[0], exc)
            return []
    return [pair for item in batch for pair in run_isolated(fn, [item], on_error)]


# -- fingerprints ----------------------------------------------------------------------------------------------------

HEAD_BYTES = 1 << 20
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "tokenizer.model",
)
MODEL_CONFIG_FILES = ("config.json", "adapter_config.json", "preprocessor_config.json")
WEIGHT_PATTERNS = ("*.safetensors", "*.bin")


def sha256_file(path: str | os.PathLike, limit: int | None = None) -> str:
    """sha256 of a file (of its first `limit` bytes with a limit)."""
    digest = hashlib.sha256()
    remaining = limit
    with open(path, "rb") as handle:
        while remaining is None or remaining > 0:
            chunk = handle.read(1 << 20 if remaining is None else min(1 << 20, remaining))
            if not chunk:
                break
            digest.update(chunk)
            if remaining is not None:
                remaining -= len(chunk)
    return digest.hexdigest()


def file_fingerprint(path: str | os.PathLike) -> dict[str, Any]:
    """Name, size and sha256 of a file's whole content."""
    path = Path(path)
    return {"name": path.name, "size": path.stat().st_size, "sha256": sha256_file(path)}


def model_fingerprint(model_dir: str | os.PathLike) -> dict[str, Any]:
    """Config hashes and, per weight file, its size and the sha256 of its first MB (the whole sha256 of a
    multi-GB checkpoint would take minutes; the safetensors header, with every tensor's offsets, is in that MB);
    a sharded checkpoint's index is hashed whole. The directory's path is recorded but not compared (see
    `same_fingerprint`)."""
    model_dir = Path(model_dir)
    configs = {n: sha256_file(model_dir / n) for n in MODEL_CONFIG_FILES if (model_dir / n).is_file()}
    weights = sorted({p for pattern in WEIGHT_PATTERNS for p in model_dir.glob(pattern)})
    index = model_dir / "model.safetensors.index.json"
    return {
        "dir": str(model_dir),
        "configs": configs,
        "index_sha256": sha256_file(index) if index.is_file() else None,
        "weights": [
            {"name": p.name, "size": p.stat().st_size, "sha256_first_mb": sha256_file(p, HEAD_BYTES)}
            for p in weights
        ],
    }


def tokenizer_fingerprint(model_dir: str | os.PathLike) -> dict[str, str]:
    """sha256 of each tokenizer file of a model directory."""
    model_dir = Path(model_dir)
    return {name: sha256_file(model_dir / name) for name in TOKENIZER_FILES if (model_dir / name).is_file()}


def comparable(fingerprint: Any) -> Any:
    """A fingerprint without the entries that may differ for the same computation (a model directory's path)."""
    if isinstance(fingerprint, dict):
        return {k: comparable(v) for k, v in fingerprint.items() if k != "dir"}
    if isinstance(fingerprint, (list, tuple)):
        return [comparable(v) for v in fingerprint]
    return fingerprint


def differing_keys(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Top-level keys whose comparable values differ between two fingerprints."""
    keys = sorted(set(recorded) | set(current))
    return [k for k in keys if comparable(recorded.get(k)) != comparable(current.get(k))]


# -- images ----------------------------------------------------------------------------------------------------------

DEFAULT_MAX_IMAGE_PIXELS = 64 * 1024 * 1024
"""The pixel cap (width x height) of every entry point that decodes images (`--max-image-pixels`): 8192 x 8192,
below Pillow's decompression-bomb warning (89.5 Mpx). An image over it is a bad record, refused from its header
before its pixels are decoded."""

BASE64_MIN_LENGTH = 1000
"""The exercise's rule: an image field longer than this is base64; a shorter one is base64 too when it decodes to an
image file's bytes (a 1x1 PNG takes about 100 characters), otherwise a path."""

_IMAGE_MAGIC = (
    b"\x89PNG\r\n\x1a\n",
    b"\xff\xd8\xff",
    b"GIF87a",
    b"GIF89a",
    b"BM",
    b"RIFF",
    b"II*\x00",
    b"MM\x00*",
)


def check_max_image_pixels(value: int, flag: str = "--max-image-pixels") -> int:
    """A usable pixel cap: positive and at most Pillow's own error limit (above it Pillow refuses by itself)."""
    limit = 2 * (Image.MAX_IMAGE_PIXELS or 0) or None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{flag} must be a positive number of pixels, got {value!r}")
    if limit is not None and value > limit:
        raise ValueError(f"{flag} {value} is above Pillow's decompression-bomb limit ({limit} pixels)")
    return value


def _short_base64_image(value: str) -> bytes | None:
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw if raw.startswith(_IMAGE_MAGIC) else None


def is_base64_image(value: str) -> bool:
    """The exercise's rule for an image field (longer than BASE64_MIN_LENGTH), or strict base64 of an image file."""
    return len(value) > BASE64_MIN_LENGTH or _short_base64_image(value) is not None


def image_source(value: str, base_dir: Path, field: str = "image") -> Path | io.BytesIO:
    """An image field (base64 or a path relative to base_dir) -> what `Image.open` reads; RecordError otherwise."""
    if len(value) > BASE64_MIN_LENGTH:
        try:
            return io.BytesIO(base64.b64decode(value, validate=False))
        except (binascii.Error, ValueError) as exc:
            raise RecordError(f"field '{field}': broken base64 ({exc})", field) from exc
    raw = _short_base64_image(value)
    if raw is not None:
        return io.BytesIO(raw)
    path = Path(value) if Path(value).is_absolute() else base_dir / value
    if not path.is_file():
        raise RecordError(f"field '{field}': file not found: {path}", field)
    return path


def open_image_header(
    source: str | os.PathLike | io.BytesIO,
    where: str,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    field: str | None = "image",
) -> Image.Image:
    """A lazily opened image (header read, pixels not decoded) whose size is within `max_pixels`; the caller closes
    it. A missing or unreadable file, a decompression bomb or an image over the cap is a RecordError naming
    `where` and the size."""
    try:
        image = Image.open(source)
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"{where}: refused as a decompression bomb ({exc})", field) from exc
    except (OSError, ValueError) as exc:  # missing, not an image, truncated header
        raise RecordError(f"{where}: not a readable image ({exc})", field) from exc
    width, height = image.size
    if width * height > max_pixels:
        image.close()
        raise ImageTooLargeError(
            f"{where}: {width}x{height} = {width * height} pixels is over the cap of {max_pixels} "
            "(--max-image-pixels)",
            field,
        )
    return image


def open_image(
    source: str | os.PathLike | io.BytesIO,
    where: str,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    field: str | None = "image",
) -> Image.Image:
    """An RGB image decoded from a path or bytes, within the pixel cap; RecordError (naming `where`) otherwise."""
    image = open_image_header(source, where, max_pixels, field)
    try:
        with image:
            return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as exc:  # truncated or corrupt pixel data
        raise RecordError(f"{where}: not a readable image ({exc})", field) from exc


# -- the resumable JSONL output --------------------------------------------------------------------------------------


def repair_torn_tail(path: str | os.PathLike) -> int:
    """Cut a file back to its last complete line by truncating it in place; returns the bytes dropped (0 when the
    file ends with a newline, is empty or does not exist). Reads only the file's tail."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return 0
    if size == 0:
        return 0
    with open(path, "rb") as handle:
        handle.seek(size - 1)
        if handle.read(1) == b"\n":
            return 0
        end = size
        keep = 0
        while end > 0:
            start = max(0, end - (1 << 16))
            handle.seek(start)
            chunk = handle.read(end - start)
            newline = chunk.rfind(b"\n")
            if newline >= 0:
                keep = start + newline + 1
                break
            end = start
    os.truncate(path, keep)
    logger.warning("%s: cut an incomplete last line (%d bytes) left by an interrupted run", path, size - keep)
    return size - keep


def read_keyed_lines(path: Path, key: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, record) of a complete JSONL output file; a line without `key` or not JSON is a ValueError
    naming the line (a file that is not ours is never appended to). A torn last line is skipped."""
    if not path.exists():
        return
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            if not raw.endswith(b"\n"):  # torn by a kill while another process holds the file: not done
                return
            try:
                record = json.loads(raw.decode("utf-8"))
                record[key]  # noqa: B018 - presence check
            except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ValueError(
                    f"{path}, line {number}: not a record of this output ({type(exc).__name__}: {exc}); "
                    "refusing to append to it"
                ) from exc
            yield number, record


class OutputLock:
    """An exclusive, non-blocking `flock` on `path`, which holds the owner's pid while it is held.

    A second holder is refused with a ValueError naming the pid written there. The file is removed on release; a
    lock taken on a file that was removed meanwhile is retaken on the new one."""

    def __init__(self, path: Path, what: str):
        self.path, self.what = Path(path), what
        self.fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                raise ValueError(
                    f"{self.what} is in use by another run (pid {self._holder()}, lock {self.path}); wait for it "
                    "to finish or choose another output"
                ) from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # released and removed between our open and our flock: take the new file
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd

    def _holder(self) -> str:
        try:
            return self.path.read_text().strip() or "unknown"
        except OSError:
            return "unknown"

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self.fd)  # closing releases the flock
            self.fd = None


class ResumableJsonl:
    """One resumable JSONL output (see the module docstring for its guarantees).

    `fingerprint` is a JSON-able dict of whatever made the records; `key` the field that identifies a record
    (`idx`); `rank`/`world_size` select a part file in a data-parallel run; `always_parts` makes a single process
    write part 0 too (for outputs that are assembled at the end, e.g. `mllm logp`). In a data-parallel run only
    rank 0 checks, resets (`overwrite`) and records the fingerprint; with a `barrier` (called by every rank) the
    other ranks wait for that and then check it, without one they only check. Use it as a context manager."""

    def __init__(
        self,
        path: str | os.PathLike,
        fingerprint: dict[str, Any],
        *,
        key: str = "idx",
        overwrite: bool = False,
        rank: int = 0,
        world_size: int = 1,
        always_parts: bool = False,
        barrier: Callable[[], None] | None = None,
        what: str = "--out",
    ):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"shard: need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
        self.path = Path(path)
        self.fingerprint = json.loads(json.dumps(fingerprint))  # as it will read back from the file
        self.key, self.overwrite, self.barrier = key, overwrite, barrier
        self.rank, self.world_size = rank, world_size
        self.what = f"{what} {self.path}"
        parallel = world_size > 1 or always_parts
        self.write_path = self.part_path(rank) if parallel else self.path
        self.done: set[Any] = set()
        self.error_keys: set[Any] = set()
        self._locks: list[OutputLock] = []
        self._handle: Any = None

    # names of the files beside the output
    @property
    def stem(self) -> str:
        name = self.path.name
        return name[: -len(".jsonl")] if name.endswith(".jsonl") else self.path.stem

    def sibling(self, suffix: str) -> Path:
        return self.path.with_name(self.stem + suffix)

    @property
    def fingerprint_path(self) -> Path:
        return self.sibling(".fingerprint.json")

    @property
    def errors_path(self) -> Path:
        return self.sibling(".errors.jsonl")

    def part_path(self, rank: int) -> Path:
        return self.sibling(f".part{rank}.jsonl")

    def part_files(self) -> list[Path]:
        """Part files of any earlier or running data-parallel run, whatever its world size."""
        return sorted(self.path.parent.glob(f"{self.stem}.part[0-9]*.jsonl"))

    # life cycle
    def __enter__(self) -> ResumableJsonl:
        try:
            self._lock()
            if self.rank == 0:
                self._check_fingerprint()
            if self.world_size > 1 and self.barrier is not None:
                self.barrier()
            if self.rank != 0:
                self._check_fingerprint()
            own = self.write_path
            if self.rank == 0 or own != self.path:
                repair_torn_tail(own)
            if self.rank == 0:
                repair_torn_tail(self.errors_path)
                if self.write_path == self.path:
                    for part in self.part_files():  # parts of a finished parallel run: their writers are gone
                        repair_torn_tail(part)
            self.done = self._read_done()
            self.error_keys = self._read_error_keys()
            self._handle = open(self.write_path, "ab")
        except BaseException:
            self._unlock()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        self._unlock()

    def _lock(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        names = [self.sibling(".lock")] if self.rank == 0 else []
        if self.write_path != self.path:
            names.append(self.sibling(f".part{self.rank}.lock"))
        for name in names:
            lock = OutputLock(name, self.what)
            lock.acquire()
            self._locks.append(lock)

    def _unlock(self) -> None:
        while self._locks:
            self._locks.pop().release()

    def _has_records(self) -> bool:
        files = [self.path, *self.part_files()]
        return any(f.exists() and f.stat().st_size > 0 for f in files)

    def _reset(self) -> None:
        """Empty the output, its parts and its errors in place (rank 0 only)."""
        for path in [self.path, *self.part_files(), self.errors_path]:
            if path.exists():
                os.truncate(path, 0)
        for part in self.part_files():
            part.unlink(missing_ok=True)

    def _check_fingerprint(self) -> None:
        recorded = read_json(self.fingerprint_path) if self.fingerprint_path.exists() else None
        if recorded is not None and not isinstance(recorded, dict):
            raise ValueError(f"{self.fingerprint_path}: not a fingerprint file (expected a JSON object)")
        if self.rank != 0:  # rank 0 recorded it (or will, when there is no barrier): check, never reset
            if recorded is None:
                write_json_atomic(self.fingerprint_path, self.fingerprint)
            elif differing_keys(recorded, self.fingerprint):
                keys = ", ".join(differing_keys(recorded, self.fingerprint))
                raise ValueError(
                    f"{self.what}: rank {self.rank} sees another fingerprint than rank 0 ({keys})"
                )
            return
        if self.overwrite:
            if self._has_records():
                logger.warning("%s: --overwrite: starting afresh, earlier records removed", self.what)
            self._reset()
        elif recorded is None:
            if self._has_records():
                raise ValueError(
                    f"{self.what} holds records but no {self.fingerprint_path.name}, so what made them is unknown "
                    "(written by an older mllm?); use --overwrite to start afresh or choose another output"
                )
        elif differing_keys(recorded, self.fingerprint):
            if self._has_records():
                keys = ", ".join(differing_keys(recorded, self.fingerprint))
                raise ValueError(
                    f"{self.what} was made with other inputs or settings (differing: {keys}; recorded in "
                    f"{self.fingerprint_path.name}); use --overwrite to start afresh or choose another output"
                )
            self._reset()  # nothing was written under the old fingerprint but its errors
        if recorded is None or differing_keys(recorded, self.fingerprint):
            write_json_atomic(self.fingerprint_path, self.fingerprint)

    def _read_done(self) -> set[Any]:
        done: set[Any] = set()
        for path in [self.path, *self.part_files()]:
            done.update(record[self.key] for _, record in read_keyed_lines(path, self.key))
        return done

    def _read_error_keys(self) -> set[Any]:
        keys: set[Any] = set()
        if self.errors_path.exists():
            for _, record in iter_jsonl(self.errors_path):
                if isinstance(record, dict) and self.key in record:
                    keys.add(record[self.key])
        return keys

    # use
    def records(self) -> dict[Any, dict[str, Any]]:
        """Every record of the output and its parts by key (the first one of a key wins)."""
        found: dict[Any, dict[str, Any]] = {}
        for path in [self.path, *self.part_files()]:
            for _, record in read_keyed_lines(path, self.key):
                found.setdefault(record[self.key], record)
        return found

    def append(self, records: Iterable[dict[str, Any]]) -> None:
        """Append whole lines, then flush and sync (one batch at a time: a kill loses at most the batch)."""
        assert self._handle is not None, "use ResumableJsonl as a context manager"
        records = list(records)
        data = b"".join(json.dumps(r, ensure_ascii=False).encode("utf-8") + b"\n" for r in records)
        if not data:
            return
        self._handle.write(data)
        self._handle.flush()
        os.fsync(self._handle.fileno())
        for record in records:
            self.done.add(record[self.key])

    def error(
        self,
        key: Any,
        message: str,
        *,
        source: str | os.PathLike | None = None,
        line: int | None = None,
        field: str | None = None,
    ) -> bool:
        """Record a failed record in the errors file, once per key; returns whether a line was added."""
        logger.warning("%s%s: %s", source or self.what, f", line {line}" if line is not None else "", message)
        if key in self.error_keys:
            return False
        entry = {self.key: key, "file": str(source) if source else None, "line": line, "field": field}
        entry["error"] = message
        with open(self.errors_path, "ab") as handle:
            handle.write(json.dumps(entry, ensure_ascii=False).encode("utf-8") + b"\n")
        self.error_keys.add(key)
        return True

    def merge_parts(self) -> int:
        """Append every part's records whose key the output lacks, sync, then delete the parts (rank 0 or a single
        process, after the other ranks closed their writers). Safe to interrupt: a rerun skips the keys already
        merged. Returns the number of lines appended."""
        if self.rank != 0:
            raise ValueError("only rank 0 merges the part files")
        done = {record[self.key] for _, record in read_keyed_lines(self.path, self.key)}
        parts = self.part_files()
        added = 0
        with open(self.path, "ab") as out:
            for part in parts:
                repair_torn_tail(part)
                for _, record in read_keyed_lines(part, self.key):
                    if record[self.key] not in done:
                        out.write(json.dumps(record, ensure_ascii=False).encode("utf-8") + b"\n")
                        done.add(record[self.key])
                        added += 1
            out.flush()
            os.fsync(out.fileno())
        for part in parts:
            part.unlink()
        return added
