"""`ServeConfig`: the settings of `mllm serve`, one field per command-line flag, checked when built."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class ServeConfig:
    """What the server listens on, whom it answers, how it batches and what it refuses."""

    model_name: str
    """The model id `GET /v1/models` lists; a request naming another model gets a 404 (`--served-model-name`)."""
    host: str = "127.0.0.1"
    """Address to listen on (`--host`): this machine only unless told otherwise."""
    port: int = 8000
    """TCP port (`--port`); 0 picks a free one."""
    api_key: str | None = None
    """When set, every /v1 request needs `Authorization: Bearer <key>` (`--api-key` or MLLM_API_KEY)."""
    max_batch_size: int = 8
    """Most sequences decoded together in one generate call (`--max-batch-size`; 1 answers one at a time)."""
    max_queue: int = 64
    """Most requests waiting for the model; one more gets 503 (`--max-queue`)."""
    batch_wait_ms: float = 100.0
    """How long the batcher waits for requests that are still arriving (being read and prepared) before it starts a
    batch (`--batch-wait-ms`); with none arriving it starts at once."""
    max_model_len: int | None = None
    """Prompt plus answer tokens allowed (`--max-model-len`; default: the model's max_position_embeddings)."""
    default_max_tokens: int = 256
    """Answer tokens when a request gives no max_tokens (`--default-max-tokens`), cut to what the context leaves."""
    max_request_bytes: int = 32 * 2**20
    """Largest request body; a bigger one gets 413 (`--max-request-bytes`)."""
    max_request_pixels: int = 40_000_000
    """Most pixels of all images of one request together; more gets 413 (`--max-request-pixels`)."""
    max_image_pixels: int = 64 * 1024 * 1024
    """Most pixels of one image, as in every other entry point (`--max-image-pixels`, `mllm.io`); more gets 413."""
    allowed_local_media_path: Path | None = None
    """`file://` image URLs are read only from under this folder; without it they are refused
    (`--allowed-local-media-path`)."""
    max_beams: int = 8
    """Largest `num_beams` a request may ask for (`--max-beams`)."""

    def __post_init__(self) -> None:
        checks = [
            (bool(self.model_name), "--served-model-name must not be empty"),
            (0 <= self.port < 65536, f"--port must be in 0..65535, got {self.port}"),
            (self.max_batch_size >= 1, f"--max-batch-size must be at least 1, got {self.max_batch_size}"),
            (self.max_queue >= 1, f"--max-queue must be at least 1, got {self.max_queue}"),
            (self.batch_wait_ms >= 0, f"--batch-wait-ms must not be negative, got {self.batch_wait_ms}"),
            (
                self.max_model_len is None or self.max_model_len >= 2,
                f"--max-model-len must be at least 2, got {self.max_model_len}",
            ),
            (
                self.default_max_tokens >= 1,
                f"--default-max-tokens must be at least 1, got {self.default_max_tokens}",
            ),
            (
                self.max_request_bytes >= 1024,
                f"--max-request-bytes must be at least 1024, got {self.max_request_bytes}",
            ),
            (
                self.max_request_pixels >= 1,
                f"--max-request-pixels must be positive, got {self.max_request_pixels}",
            ),
            (self.max_image_pixels >= 1, f"--max-image-pixels must be positive, got {self.max_image_pixels}"),
            (self.max_beams >= 1, f"--max-beams must be at least 1, got {self.max_beams}"),
            (self.api_key is None or bool(self.api_key.strip()), "--api-key must not be blank"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        root = self.allowed_local_media_path
        if root is not None and not Path(root).is_dir():
            raise ValueError(f"--allowed-local-media-path {root} is not a folder")

    @property
    def exposed(self) -> bool:
        """Whether other machines can reach the server."""
        return self.host not in LOOPBACK_HOSTS
