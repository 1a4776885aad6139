"""`benchmarks/gpu_rehearsal.py --tiny`: every step of the GPU rehearsal, through the same command lines, on CPU at a
tiny shape (a smoke test of the script and of the commands it drives, not a measurement)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from helpers.training import distributed_env

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_rehearsal_tiny_runs_every_step(tmp_path: Path) -> None:
    out = tmp_path / "rehearsal.json"
    argv = [sys.executable, str(ROOT / "benchmarks" / "gpu_rehearsal.py"), "--tiny", "--device", "cpu"]
    argv += ["--out", str(out), "--workdir", str(tmp_path / "work")]
    result = subprocess.run(argv, env=distributed_env(), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-6000:]
    report = json.loads(out.read_text())
    steps = report["steps"]
    assert len(steps) == 8 and {"zero3_full", "fsdp_full", "answer"} <= set(steps)  # every step ran
    assert all(step["status"].startswith("ok") for step in steps.values()) and report["failed"] == []
    assert steps["answer"]["items"] == report["settings"]["answer_items"]
    assert (
        steps["sft_lora"]["steps"] == report["settings"]["sft_steps"]
        and steps["sft_lora"]["tokens_per_s"] > 0
    )
    reload = steps["zero3_full"][
        "reload"
    ]  # ZeRO-3 saved every weight, trained, and the frozen tower untouched
    assert reload["ok"] and reload["changed"] == reload["trained_matrices"] > 0 and reload["empty"] == 0
    assert steps["logp"]["pairs"] == report["settings"]["preference_pairs"]
    assert steps["fsdp_full"]["status"] == "ok: refused on CPU, as it must be"
    assert report["versions"]["deepspeed"] and report["device"] == "cpu"
