"""The tiny Qwen2/Llama shape of the LLM tests: fields that `MLLMConfig`, `Qwen2Config` and `LlamaConfig` all take.

Imported by the LLM parity and fast-generation tests (pytest puts this folder on the import path).
"""

TINY_LLM = dict(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rope_theta=10000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
)
