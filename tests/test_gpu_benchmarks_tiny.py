"""The GPU benchmarks' `--tiny` mode on CPU (a smoke test of the scripts, not a measurement), the README tables they
feed, and the raw result files they write."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_results(tmp_path_factory) -> Path:
    """The three GPU benchmarks' --tiny runs, their raw JSON in one folder (shared by the tests below)."""
    folder = tmp_path_factory.mktemp("results")
    load_script("gpu_generate").main(["--tiny", "--grid", "full", "--out", str(folder / "gpu_generate.json")])
    load_script("gpu_sft").main(["--tiny", "--out", str(folder / "gpu_sft.json")])
    load_script("gpu_answer_job").main(["--tiny", "--out", str(folder / "gpu_answer_job.json")])
    return folder


def read(folder: Path, name: str) -> dict:
    result = json.loads((folder / f"{name}.json").read_text())
    assert result["benchmark"] == name and result["complete"] is True
    assert result["device"] == "cpu" and result["torch"] and result["transformers"] and result["date"]
    assert result["command"].startswith(f"benchmarks/{name}.py --tiny")  # how to run it again
    return result


def test_gpu_generate_tiny(tiny_results):
    result = read(tiny_results, "gpu_generate")
    paths = ["ours --fast-generate", "ours --static-cache", "transformers static", "transformers dynamic"]
    rows = {(r["path"], r["batch"], r["strategy"]): r for r in result["decode"]}
    expected = {(p, b, s) for p in paths for b in (1, 16, 64) for s in ("greedy", "beam")}
    assert set(rows) == expected  # every path at batch 1, 16 and 64, greedy and beam 3
    # Timings on a shared CPU are noise (a step can even come out negative); the shape of the rows is the test.
    assert all(math.isfinite(r["ms_per_step"]) and r["new_tokens"] >= 2 for r in rows.values())
    assert not any(r["compiled"] for r in rows.values())  # CPU: nothing compiles
    # fp32 on CPU: every path gives the dynamic cache's tokens, in the timed rows and in the token check
    assert all(r["agreement_vs_dynamic"] == 1.0 for r in rows.values())
    assert len(result["token_check"]) == 6 and all(c["same_tokens"] for c in result["token_check"])
    jobs = {j["engine"]: j for j in result["job"]}
    assert set(jobs) == {"ours --fast-generate", "ours --static-cache"}
    assert all(j["items"] == 4 and j["failed"] == 0 and j["new_tokens"] > 0 for j in jobs.values())


def test_gpu_sft_tiny(tiny_results):
    result = read(tiny_results, "gpu_sft")
    rows = {(r["path"], r["compiled"]): r for r in result["rows"]}
    assert set(rows) == {(p, c) for p in ("ours", "transformers + peft") for c in (False, True)}
    assert all("error" not in r and r["tokens_per_s"] > 0 for r in rows.values())
    # Same LoRA on the same shape: both train the same number of adapter weights.
    assert len({r["trainable_params"] for r in rows.values()}) == 1
    for path in ("ours", "transformers + peft"):  # compiling (aot_eager on CPU) trains to the eager losses
        assert rows[(path, True)]["loss"] == pytest.approx(rows[(path, False)]["loss"], rel=1e-4)


def test_gpu_answer_job_tiny(tiny_results):
    result = read(tiny_results, "gpu_answer_job")
    jobs = {j["engine"]: j for j in result["jobs"]}
    assert set(jobs) == {"fast", "static"}
    for engine, flag in (("fast", "--fast-generate"), ("static", "--static-cache")):
        job = jobs[engine]
        assert job["answered"] == 4 and job["failed"] == 0 and job["new_tokens"] > 0
        assert job["process_s"] >= job["answer_s"] > 0 and job["command"].endswith(flag)


def test_tables_render_every_target_from_the_tiny_runs(tiny_results, capsys):
    block = load_script("results_table").main(["--results", str(tiny_results), "--include-cpu"])
    assert block in capsys.readouterr().out
    targets = [
        line
        for line in block.splitlines()
        if line.startswith(("| decode step", "| objhal", "| the same", "| LoRA"))
    ]
    assert len(targets) == 6
    assert not any("not yet measured" in line for line in targets)  # every target row has both sides
    assert block.count("| ours --fast-generate | ") == 6 and "| transformers + peft | yes |" in block
    # Without --include-cpu the same files count for nothing.
    assert block.count("not yet measured") == 0
    empty = load_script("results_table").main(["--results", str(tiny_results)])
    assert empty.count("| not yet measured | not yet measured | not yet measured |") == 6


def test_verdicts_compare_against_the_strongest_baseline():
    table = load_script("results_table")

    def run(ours: float, static: float, dynamic: float) -> dict:
        rows = [
            ("ours --fast-generate", ours),
            ("transformers static", static),
            ("transformers dynamic", dynamic),
        ]
        decode = [{"path": p, "batch": 1, "strategy": "greedy", "ms_per_step": ms} for p, ms in rows]
        return {"decode": decode}

    line = table.decode_target(run(5.0, 7.1, 18.5), 1, "greedy", 4.7, "b1")
    assert line.endswith("| not met |") and "7.10 (transformers static)" in line
    assert table.decode_target(run(4.5, 9.0, 4.6), 1, "greedy", 4.7, "b1").endswith(
        "4.60 (transformers dynamic) | met (the baseline meets it too) |"
    )
    assert table.decode_target(run(4.5, 9.0, 9.0), 1, "greedy", 4.7, "b1").endswith("| met |")
    ours_only = {
        "decode": [{"path": "ours --fast-generate", "batch": 1, "strategy": "greedy", "ms_per_step": 1.0}]
    }
    assert table.decode_target(ours_only, 1, "greedy", 4.7, "b1").endswith("| not yet measured |")


def test_readme_tables_are_the_committed_results():
    table = load_script("results_table")
    committed = table.render(table.load_runs(table.RESULTS, include_cpu=False))
    assert table.readme_block(table.README.read_text()) == committed, (
        "README.md's benchmark tables differ from benchmarks/results/: run python benchmarks/results_table.py "
        "--write-readme"
    )


def test_result_files_are_not_overwritten_silently(tmp_path):
    from mllm.bench import ResultFile

    out = tmp_path / "r.json"
    ResultFile(out, {"benchmark": "x"}).append("rows", {"a": 1})
    with pytest.raises(ValueError, match="--overwrite"):
        ResultFile(out, {"benchmark": "x"})
    assert json.loads(out.read_text())["rows"] == [{"a": 1}]
    assert ResultFile(out, {"benchmark": "x"}, overwrite=True).finish() == {
        "benchmark": "x",
        "complete": True,
    }


def test_gpu_checks_run_on_cpu(tmp_path):
    out = tmp_path / "checks.json"
    assert load_script("gpu_checks").main(["--device", "cpu", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    checks = {k: v for k, v in result.items() if isinstance(v, dict)}
    assert len(checks) == 7  # 2 fp32 backends, bf16, 3 greedy paths, the training step
    assert all(v["ok"] for v in checks.values())
    assert result["device"] == "cpu" and result["flash_attention_2"].startswith("not checked")
