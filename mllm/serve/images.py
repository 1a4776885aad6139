"""Request messages -> the processor's messages: `image_url` parts decoded into PIL images, with limits.

Images come as base64 data URLs, or as `file://` URLs under the folder the server allows (none by default).
Remote http(s) URLs are not fetched. Sizes are read from the image header before any pixel is decoded, so an
image over the request's pixel budget (or a decompression bomb) costs nothing: it gets a 413.
"""

from __future__ import annotations

import base64
import binascii
import io
from pathlib import Path
from urllib.parse import unquote, urlparse

from PIL import Image

from mllm.io import ImageTooLargeError, RecordError, open_image, open_image_header
from mllm.serve.schemas import APIError, Message


class ImageBudget:
    """Pixels left for one request's images (`--max-request-pixels` covers all of them together,
    `--max-image-pixels` each one)."""

    def __init__(self, max_pixels: int, max_image_pixels: int):
        self.max_pixels = max_pixels
        self.max_image_pixels = max_image_pixels
        self.used = 0

    def take(self, size: tuple[int, int], where: str) -> None:
        if size[0] * size[1] > self.max_image_pixels:
            raise APIError(
                413,
                f"{where}: {size[0]}x{size[1]} is more than the server's limit of {self.max_image_pixels} pixels "
                "per image (--max-image-pixels)",
                param=where,
                code="image_too_large",
            )
        self.used += size[0] * size[1]
        if self.used > self.max_pixels:
            raise APIError(
                413,
                f"{where}: {size[0]}x{size[1]} brings the request's images to {self.used} pixels, more than the "
                f"server's limit of {self.max_pixels} (--max-request-pixels)",
                param=where,
                code="image_too_large",
            )


def read_image_bytes(url: str, allowed_root: Path | None, where: str) -> bytes:
    """The encoded image of a data URL or an allowed file:// URL."""
    if url.startswith("data:"):
        header, sep, payload = url.partition(",")
        if not sep or not header.endswith(";base64"):
            raise APIError(400, f"{where}: expected a data URL 'data:image/...;base64,<data>'", param=where)
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise APIError(400, f"{where}: the base64 data does not decode ({exc})", param=where) from None
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return read_local_file(Path(unquote(parsed.path)), allowed_root, where)
    raise APIError(
        400,
        f"{where}: only base64 data URLs and file:// URLs under --allowed-local-media-path are accepted "
        f"(got a {parsed.scheme or 'schemeless'} URL; remote images are not fetched)",
        param=where,
    )


def read_local_file(path: Path, allowed_root: Path | None, where: str) -> bytes:
    if allowed_root is None:
        raise APIError(
            400, f"{where}: file:// URLs need the server started with --allowed-local-media-path", param=where
        )
    root = Path(allowed_root).resolve()
    resolved = path.resolve()
    if not resolved.is_relative_to(root):
        raise APIError(400, f"{where}: {path} is not under the allowed folder {root}", param=where)
    if not resolved.is_file():
        raise APIError(400, f"{where}: {path} is not a file", param=where)
    return resolved.read_bytes()


def decode_image(data: bytes, budget: ImageBudget, where: str) -> Image.Image:
    """Encoded bytes -> an RGB image through `mllm.io`'s header-checked decoding, its size charged to `budget`
    before the pixels are decoded. An image refused for its size is a 413, an unreadable one a 400."""
    try:
        with open_image_header(io.BytesIO(data), where, budget.max_image_pixels, field=None) as header:
            budget.take(header.size, where)
        return open_image(io.BytesIO(data), where, budget.max_image_pixels, field=None)
    except ImageTooLargeError as exc:
        raise APIError(413, str(exc), param=where, code="image_too_large") from None
    except RecordError as exc:
        raise APIError(400, str(exc), param=where) from None


def to_chat_messages(
    messages: list[Message], allowed_root: Path | None, max_pixels: int, max_image_pixels: int
) -> list[dict]:
    """OpenAI messages -> `processor.prepare_chat_inputs` messages (content: strings and PIL images in order).
    `developer` is the newer name of `system`."""
    budget = ImageBudget(max_pixels, max_image_pixels)
    converted = []
    for i, message in enumerate(messages):
        role = "system" if message.role == "developer" else message.role
        if isinstance(message.content, str):
            converted.append({"role": role, "content": message.content})
            continue
        content: list = []
        for j, part in enumerate(message.content):
            where = f"messages.{i}.content.{j}"
            if part.type == "text":
                content.append(part.text)
            else:
                data = read_image_bytes(part.image_url.url, allowed_root, f"{where}.image_url")
                content.append(decode_image(data, budget, f"{where}.image_url"))
        converted.append({"role": role, "content": content})
    return converted
