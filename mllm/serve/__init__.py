"""`mllm serve`: an OpenAI-compatible chat-completions server with dynamic batching (FastAPI + uvicorn, from the
optional extra `serve`). `app` holds the routes, `batcher` the batching worker, `schemas` the wire format, `images`
the image decoding and its limits, `config` the settings."""
