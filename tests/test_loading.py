"""Strict loading and saving: round trips, shards, .bin, and clear errors for broken checkpoints."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from mllm import MLLMConfig, MLLMModel


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return MLLMModel.from_pretrained(tiny_model_dir)


def copy_checkpoint(src, dst, weights: dict[str, torch.Tensor] | None = None):
    """config.json (+ the given weights as model.safetensors) into dst."""
    dst.mkdir(exist_ok=True)
    shutil.copy(src / "config.json", dst / "config.json")
    if weights is not None:
        save_file(weights, str(dst / "model.safetensors"))
    return dst


def same_weights(a: MLLMModel, b: MLLMModel) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_checkpoint_keys_are_exactly_the_models(model, tiny_model_dir):
    assert set(load_file(str(tiny_model_dir / "model.safetensors"))) == set(model.state_dict())


def test_save_load_round_trip(model, tmp_path):
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    reloaded = MLLMModel.from_pretrained(tmp_path)
    assert same_weights(model, reloaded)
    assert reloaded.config.to_dict()["vision_config"] == model.config.to_dict()["vision_config"]
    ids = torch.tensor([[984, 362, 198, 40, 41]])
    with torch.no_grad():
        assert torch.equal(model.llm(input_ids=ids).logits, reloaded.llm(input_ids=ids).logits)


def test_sharded_round_trip(model, tmp_path):
    model.save_pretrained(tmp_path, max_shard_size="2MB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 4 and not (tmp_path / "model.safetensors").exists()
    assert same_weights(model, MLLMModel.from_pretrained(tmp_path))


def test_bin_checkpoint_loads(model, tmp_path, tiny_model_dir):
    copy_checkpoint(tiny_model_dir, tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    assert same_weights(model, MLLMModel.from_pretrained(tmp_path))


def test_dtype_and_minicpmv_model_type(tmp_path, tiny_model_dir):
    copy_checkpoint(tiny_model_dir, tmp_path)
    shutil.copy(tiny_model_dir / "model.safetensors", tmp_path / "model.safetensors")
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "minicpmv"}))
    loaded = MLLMModel.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert isinstance(loaded.config, MLLMConfig)


def test_missing_and_unexpected_keys_are_listed(model, tmp_path, tiny_model_dir):
    weights = dict(model.state_dict())
    weights.pop("resampler.query")
    weights["vpm.encoder.layers.2.mlp.fc1.weight"] = torch.zeros(2, 2)
    copy_checkpoint(tiny_model_dir, tmp_path, weights)
    with pytest.raises(ValueError) as err:
        MLLMModel.from_pretrained(tmp_path)
    assert "resampler.query" in str(err.value) and "vpm.encoder.layers.2.mlp.fc1.weight" in str(err.value)
    assert "1 missing" in str(err.value) and "1 unexpected" in str(err.value)


def test_mismatched_shape_names_the_key(model, tmp_path, tiny_model_dir):
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    weights["llm.lm_head.weight"] = torch.zeros(10, 256)
    copy_checkpoint(tiny_model_dir, tmp_path, weights)
    with pytest.raises(ValueError, match=r"llm\.lm_head\.weight has shape \(10, 256\)"):
        MLLMModel.from_pretrained(tmp_path)


def test_missing_weight_files_are_clear_errors(model, tmp_path, tiny_model_dir):
    copy_checkpoint(tiny_model_dir, tmp_path)
    with pytest.raises(FileNotFoundError, match="no weights"):
        MLLMModel.from_pretrained(tmp_path)
    model.save_pretrained(tmp_path, max_shard_size="2MB")
    (tmp_path / "model-00002-of-00005.safetensors").unlink(missing_ok=True)
    shard = sorted(tmp_path.glob("model-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match="shard files that do not exist"):
        MLLMModel.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        MLLMModel.from_pretrained(tmp_path / "nowhere")


def test_tied_embeddings_save_and_load(tmp_path):
    config = MLLMConfig(
        vocab_size=50,
        hidden_size=128,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=True,
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_attention_heads": 2,
            "num_hidden_layers": 2,
        },
        query_num=4,
    )
    model = MLLMModel(config)
    assert model.llm.lm_head.weight is model.llm.model.embed_tokens.weight
    model.save_pretrained(tmp_path)
    assert "llm.lm_head.weight" not in load_file(str(tmp_path / "model.safetensors"))
    loaded = MLLMModel.from_pretrained(tmp_path)
    assert loaded.llm.lm_head.weight is loaded.llm.model.embed_tokens.weight
    assert same_weights(model, loaded)


def test_real_minicpmv26_config_builds_on_meta_with_8b_parameters(tmp_path):
    """The official layout (model_type "minicpmv", Qwen2-7B + SigLIP-400M) parses and builds without memory."""
    real = {
        "model_type": "minicpmv",
        "architectures": ["MiniCPMV"],
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "vocab_size": 151666,
        "rope_theta": 1000000.0,
        "rope_scaling": None,
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 32768,
        "sliding_window": 131072,
        "use_sliding_window": False,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "query_num": 64,
        "image_size": 448,
        "drop_vision_last_layer": True,
        "batch_vision_input": True,
        "slice_config": {
            "max_slice_nums": 9,
            "model_type": "minicpmv",
            "patch_size": 14,
            "scale_resolution": 448,
        },
        "vision_config": {
            "hidden_size": 1152,
            "image_size": 980,
            "intermediate_size": 4304,
            "model_type": "siglip",
            "num_attention_heads": 16,
            "num_hidden_layers": 27,
            "patch_size": 14,
        },
    }
    (tmp_path / "config.json").write_text(json.dumps(real))
    config = MLLMConfig.from_pretrained(tmp_path)
    assert (config.hidden_size, config.num_hidden_layers, config.sliding_window) == (3584, 28, None)
    assert config.vision.hidden_act == "gelu_pytorch_tanh" and config.num_vision_layers == 26
    assert config.dtype == torch.bfloat16
    with torch.device("meta"):
        model = MLLMModel(config)
    total = sum(p.numel() for p in model.parameters())
    assert 8.0e9 < total < 8.2e9
    keys = set(model.state_dict())
    assert (
        "vpm.encoder.layers.25.mlp.fc2.weight" in keys and "vpm.encoder.layers.26.mlp.fc2.weight" not in keys
    )
    assert model.resampler.attn.num_heads == 28


def test_fill_random_sets_every_norm_scale_to_one(model):
    """Benchmarks' random weights: the resampler's LayerNorms (`ln_q`, `ln_kv`, `ln_post`, no "norm" in their names)
    are scales of 1 like every other norm, not 0 (which would cut the image rows off the gradient)."""
    from mllm.model.loading import fill_random_

    copy = MLLMModel(model.config)
    fill_random_(copy, torch.device("cpu"))
    params = dict(copy.named_parameters())
    for name in ("resampler.ln_q.weight", "resampler.ln_kv.weight", "resampler.ln_post.weight"):
        assert torch.equal(params[name], torch.ones_like(params[name])), name
    assert torch.equal(params["resampler.ln_q.bias"], torch.zeros_like(params["resampler.ln_q.bias"]))
    assert all(float(p.std()) > 0.01 for p in params.values() if p.dim() >= 2)
