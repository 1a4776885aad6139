"""`mllm web`: a Gradio chat page over the same processor, `generate` and box parsing as the CLI.

`session` holds the page's logic without Gradio (one conversation, decoding settings, streaming), `grounding`
finds and draws boxes, `app` builds the Gradio page and serves it. Gradio is imported only when a page is built.
"""
