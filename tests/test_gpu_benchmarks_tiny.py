"""The GPU benchmarks' `--tiny` mode runs on CPU in seconds (a smoke test of the scripts, not a measurement)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_generate_tiny(tmp_path, capsys):
    out = tmp_path / "generate.json"
    result = load_script("gpu_generate").main(["--tiny", "--device", "cpu", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    paths = {(r["path"], r["batch"], r["strategy"]) for r in result["decode"]}
    assert len(paths) == 8  # 2 paths x 2 batch sizes x 2 strategies
    assert all(r["ms_per_step"] > 0 and r["new_tokens"] >= 2 for r in result["decode"])
    ours = [r for r in result["decode"] if r["path"].startswith("ours")]
    assert all(r["token_agreement"] == 1.0 for r in ours)  # fp32 on CPU: the same tokens as transformers
    assert not any(r.get("compiled") for r in result["decode"])  # CPU: the eager static-cache step
    job = result["job"]
    assert job["items"] == job["distinct_idx"] == 4 and job["new_tokens"] > 0
    assert "| ours (static cache) |" in capsys.readouterr().out


def test_gpu_sft_tiny(tmp_path):
    out = tmp_path / "sft.json"
    result = load_script("gpu_sft").main(["--tiny", "--device", "cpu", "--out", str(out)])
    assert [r["path"] for r in result["rows"]] == ["ours", "transformers + peft"]
    assert all(r["tokens_per_s"] > 0 for r in result["rows"])
    # Same LoRA on the same shape: both train the same number of adapter weights.
    assert result["rows"][0]["trainable_params"] == result["rows"][1]["trainable_params"] > 0
    assert out.is_file()


def test_gpu_checks_run_on_cpu(tmp_path):
    out = tmp_path / "checks.json"
    assert load_script("gpu_checks").main(["--device", "cpu", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    checks = {k: v for k, v in result.items() if isinstance(v, dict)}
    assert len(checks) == 7  # 2 fp32 backends, bf16, 3 greedy paths, the training step
    assert all(v["ok"] for v in checks.values())
    assert result["device"] == "cpu" and result["flash_attention_2"].startswith("not checked")
