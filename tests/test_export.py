"""`mllm export --format minicpmv` and saving models loaded from the official layout.

The real remote code of openbmb/MiniCPM-V-2_6 is not reachable from CI, so the official directory here is the
fixture checkpoint with the official metadata and stand-in .py files (each with a distinct body, so byte-for-byte
copying is checked, and with classes transformers can import, so `trust_remote_code=True` is exercised)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

STAND_INS = {
    "configuration_minicpm.py": (
        "# stand-in for the official configuration_minicpm.py\n"
        "from transformers import PretrainedConfig\n\n\n"
        "class MiniCPMVConfig(PretrainedConfig):\n"
        '    model_type = "minicpmv"\n'
    ),
    "modeling_minicpmv.py": "# stand-in for the official modeling_minicpmv.py\nclass MiniCPMV:\n    pass\n",
    "resampler.py": "# stand-in for the official resampler.py (imported by the modeling file)\n",
    "tokenization_minicpmv_fast.py": (
        "# stand-in for the official tokenization_minicpmv_fast.py\n"
        "from transformers import PreTrainedTokenizerFast\n\n\n"
        "class MiniCPMVTokenizerFast(PreTrainedTokenizerFast):\n"
        "    pass\n"
    ),
    "processing_minicpmv.py": "# stand-in for the official processing_minicpmv.py\nclass MiniCPMVProcessor:\n    pass\n",
    "image_processing_minicpmv.py": (
        "# stand-in for the official image_processing_minicpmv.py\nclass MiniCPMVImageProcessor:\n    pass\n"
    ),
}
CONFIG_AUTO_MAP = {
    "AutoConfig": "configuration_minicpm.MiniCPMVConfig",
    "AutoModel": "modeling_minicpmv.MiniCPMV",
    "AutoModelForCausalLM": "modeling_minicpmv.MiniCPMV",
}
TOKENIZER_AUTO_MAP = {"AutoTokenizer": ["tokenization_minicpmv_fast.MiniCPMVTokenizerFast", None]}
PROCESSOR_AUTO_MAP = {
    "AutoProcessor": "processing_minicpmv.MiniCPMVProcessor",
    "AutoImageProcessor": "image_processing_minicpmv.MiniCPMVImageProcessor",
}


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data, indent=2))


@pytest.fixture(scope="module")
def official_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The fixture checkpoint laid out as the official release: config, tokenizer and processor metadata with
    auto_maps, and the remote-code files."""
    out = tmp_path_factory.mktemp("official") / "MiniCPM-V-2_6"
    shutil.copytree(tiny_model_dir, out, ignore=shutil.ignore_patterns("expected", "images", "README.md"))
    for path in out.iterdir():
        path.chmod(0o644)
    config = json.loads((out / "config.json").read_text())
    slice_config = {**config["slice_config"], "model_type": "minicpmv"}
    edit_json(
        out / "config.json",
        model_type="minicpmv",
        architectures=["MiniCPMV"],
        auto_map=CONFIG_AUTO_MAP,
        slice_config=slice_config,
    )
    edit_json(
        out / "tokenizer_config.json", auto_map=TOKENIZER_AUTO_MAP, tokenizer_class="MiniCPMVTokenizerFast"
    )
    edit_json(
        out / "preprocessor_config.json",
        auto_map=PROCESSOR_AUTO_MAP,
        image_processor_type="MiniCPMVImageProcessor",
        processor_class="MiniCPMVProcessor",
    )
    for name, text in STAND_INS.items():
        (out / name).write_text(text)
    return out


def greedy_tokens(model_dir: Path) -> list[int]:
    from mllm.model.chat import decoding_kwargs
    from mllm.model.modeling import MLLMModel
    from mllm.processing.processor import MLLMProcessor

    model = MLLMModel.from_pretrained(model_dir)
    processor = MLLMProcessor.from_pretrained(model_dir)
    batch = processor.chat_batch([[{"role": "user", "content": "What is in the image?"}]])
    kwargs = decoding_kwargs("greedy", max_new_tokens=8)
    out = model.generate(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        tokenizer=processor.tokenizer,
        **kwargs,
    )
    return out[0].tolist()


TEXT = "<|im_start|>user\n<image><unk></image>\nWhat is this?<|im_end|>"
REMOTE_CODE_CHECK = """
import json, sys
from transformers import AutoConfig, AutoTokenizer
name = lambda obj: type(obj).__module__.rsplit(".", 1)[-1] + "." + type(obj).__name__
config = AutoConfig.from_pretrained(sys.argv[1], trust_remote_code=True)
found = {"config": name(config), "hidden_size": config.hidden_size}
if len(sys.argv) > 2:
    tokenizer = AutoTokenizer.from_pretrained(sys.argv[1], trust_remote_code=True)
    found.update(tokenizer=name(tokenizer), ids=tokenizer.encode(sys.argv[2]))
print(json.dumps(found))
"""


def remote_code_classes(model_dir: Path, text: str | None = None) -> dict:
    """What transformers' Auto classes build from `model_dir` with trust_remote_code (the tokenizer too, to encode
    `text`), in a process without mllm."""
    import subprocess
    import sys

    command = [sys.executable, "-c", REMOTE_CODE_CHECK, str(model_dir), *([text] if text else [])]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_export_writes_the_official_layout(tiny_model_dir, official_dir, tmp_path):
    from transformers import AutoTokenizer

    from mllm.cli import main

    out = tmp_path / "exported"
    assert (
        main(["export", str(tiny_model_dir), str(out), "--format", "minicpmv", "--base", str(official_dir)])
        == 0
    )
    config = json.loads((out / "config.json").read_text())
    assert (config["model_type"], config["architectures"], config["torch_dtype"]) == (
        "minicpmv",
        ["MiniCPMV"],
        "float32",
    )
    assert config["auto_map"] == CONFIG_AUTO_MAP and config["slice_config"]["model_type"] == "minicpmv"
    assert "dtype" not in config and "projector" not in config and "normalize_image_rows" not in config
    ours = json.loads((tiny_model_dir / "config.json").read_text())
    for key in ("hidden_size", "num_hidden_layers", "vocab_size", "vision_config", "query_num", "version"):
        assert config[key] == ours[key], key
    assert (out / "model.safetensors").read_bytes() == (tiny_model_dir / "model.safetensors").read_bytes()
    for name in STAND_INS:  # every .py of the base, byte for byte
        assert (out / name).read_bytes() == (official_dir / name).read_bytes(), name
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tokenizer_config["auto_map"] == TOKENIZER_AUTO_MAP
    assert tokenizer_config["tokenizer_class"] == "MiniCPMVTokenizerFast"
    preprocessor = json.loads((out / "preprocessor_config.json").read_text())
    assert preprocessor["auto_map"] == PROCESSOR_AUTO_MAP and preprocessor["scale_resolution"] == 448

    # transformers' remote-code path resolves every auto_map entry to the copied files. In a fresh process, as in
    # vLLM's: where mllm is imported, its own registered "minicpmv" config class takes precedence.
    assert remote_code_classes(out, TEXT) == {
        "config": "configuration_minicpm.MiniCPMVConfig",
        "hidden_size": 256,
        "tokenizer": "tokenization_minicpmv_fast.MiniCPMVTokenizerFast",
        "ids": AutoTokenizer.from_pretrained(str(tiny_model_dir)).encode(TEXT),
    }

    # and mllm itself reads the export (no remote code run) with the same answers
    assert greedy_tokens(out) == greedy_tokens(tiny_model_dir)


def test_a_model_loaded_from_the_official_layout_keeps_it_when_saved(official_dir, tmp_path):
    from transformers import AutoConfig

    from mllm.model.modeling import MLLMModel

    model = MLLMModel.from_pretrained(official_dir)
    assert model.config.model_type == "minicpmv"
    model.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert (saved["model_type"], saved["architectures"], saved["auto_map"]) == (
        "minicpmv",
        ["MiniCPMV"],
        CONFIG_AUTO_MAP,
    )
    for name in STAND_INS:  # the remote code came along from the directory the model was loaded from
        assert (tmp_path / "saved" / name).read_bytes() == (official_dir / name).read_bytes()
    assert remote_code_classes(tmp_path / "saved")["config"] == "configuration_minicpm.MiniCPMVConfig"

    # loaded from a copy without the .py files: the saved config drops its auto_map instead of pointing at
    # files that are not there (the failure of main: "does not appear to have a file named configuration_minicpm.py")
    bare = tmp_path / "bare"
    shutil.copytree(official_dir, bare, ignore=shutil.ignore_patterns("*.py"))
    MLLMModel.from_pretrained(bare).save_pretrained(tmp_path / "saved_bare")
    saved = json.loads((tmp_path / "saved_bare" / "config.json").read_text())
    assert saved["model_type"] == "minicpmv" and "auto_map" not in saved
    config = AutoConfig.from_pretrained(str(tmp_path / "saved_bare"), trust_remote_code=True)  # mllm's class
    assert config.model_type == "minicpmv" and config.hidden_size == 256


def test_merge_lora_writes_the_official_layout(official_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    from mllm.cli import main
    from mllm.model.modeling import MLLMModel

    torch.manual_seed(0)
    model = MLLMModel.from_pretrained(official_dir)
    key = "llm.model.layers.0.self_attn.q_proj.weight"
    original = model.state_dict()[key].clone()
    lora = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    lora.save_pretrained(tmp_path / "adapter")
    out = tmp_path / "merged"
    args = ["merge-lora", str(official_dir), str(tmp_path / "adapter"), str(out), "--format", "minicpmv"]
    assert main(args) == 0
    config = json.loads((out / "config.json").read_text())
    assert (config["model_type"], config["auto_map"], config["torch_dtype"]) == (
        "minicpmv",
        CONFIG_AUTO_MAP,
        "float32",
    )
    assert all((out / name).read_bytes() == (official_dir / name).read_bytes() for name in STAND_INS)
    assert not torch.equal(MLLMModel.from_pretrained(out).state_dict()[key], original)  # the adapter is in
    assert not list(tmp_path.glob(".merged.*")), "the staging directory is removed"


def test_refusals(tiny_model_dir, official_dir, tmp_path):
    from mllm.model.export import export_minicpmv

    no_code = tmp_path / "no_code"
    shutil.copytree(official_dir, no_code, ignore=shutil.ignore_patterns("modeling_minicpmv.py"))
    with pytest.raises(ValueError, match=r"names \['modeling_minicpmv.py'\]"):
        export_minicpmv(tiny_model_dir, tmp_path / "a", no_code)
    with pytest.raises(ValueError, match="no auto_map"):
        export_minicpmv(tiny_model_dir, tmp_path / "b", tiny_model_dir)
    scratch = tmp_path / "scratch"
    shutil.copytree(tiny_model_dir, scratch, ignore=shutil.ignore_patterns("expected", "images"))
    (scratch / "config.json").chmod(0o644)
    edit_json(scratch / "config.json", projector="merge")
    with pytest.raises(ValueError, match="projector is 'merge'"):
        export_minicpmv(scratch, tmp_path / "c", official_dir)
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "result.txt").write_text("a user's file")
    with pytest.raises(ValueError, match="not empty"):
        export_minicpmv(tiny_model_dir, taken, official_dir)
    assert (taken / "result.txt").read_text() == "a user's file"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], (
        "no staging directory is left behind"
    )
