"""The full `mllm demo` (what `make demo` runs, seed 0), read as a skeptic would (issue 26), from OUT/metrics.json.

Every check runs twice: on the committed seed-0 run (`docs/results/demo_seeds/2026-12-05/seed0.json`, the run the
README quotes; part of `make test`), and on a fresh full demo (marked `full_demo`: only `make test-full-demo`, or
pytest's `--full-demo`, runs it). The fresh run is not part of `make test` because it does not fit CI's 90 minutes on
every machine CI gets: about 14 minutes on 2 cores with avx512_bf16, ~100 minutes on a 2-core AVX2-only EPYC, where a
CI run with it timed out (docs/LOG.md, 2026-12-05 (second and third sessions)). More checks keep the committed files
honest in CI: each run was made by the recipe the code runs today (every `DemoConfig` field equal), and the README
shows their figures (the table of seeds 0-4, the runs on another CPU, the REC-only probe).

The thresholds were fixed on 2026-12-04 from the seed-0 run of that day's recipe, before the runs of seeds 1-4, and
left unchanged when the `questions` stage joined the recipe (2026-12-05); where issue 26's criterion is reached the
issue's own value is asserted. Measured on seed 0, 2026-12-04 recipe -> with the `questions` stage:
- every part-1 metric is written for both models (`after_sft`, `after_preference`), with intervals, MME pair accuracy
  and image-blind baselines fit on the training data, each compared with the model on the same items (McNemar);
- yes/no after SFT beats every image-blind rule by McNemar's exact one-sided test (77.3% -> 78.3% against at most
  51.7%, p < 1e-18); every category >= 65% (the issue's value; colour 85.3 -> 89.3, count 79.3 -> 82.7, existence
  69.3 -> 72.7, position 75.3 -> 68.7) and above chance; MME pair accuracy >= 60% (the issue's value; 61.7 -> 62.0%);
- Acc@0.5 after SFT beats the mean training box on the same expressions (6.25 -> 5.0% against 2.0%, one-sided p 0.002
  -> 0.018);
- greedy CHAIRi <= 10% (4.0 -> 5.0%), and preference training cuts the sampled CHAIRi by >= 30% (12.3 -> 5.8, then
  13.7 -> 8.1) while recall, yes/no and Acc@0.5 fall by at most 5, 3 and 3 points (the issue's values).

Not asserted, because the demo does not reach them (issue 26, part 2, stays open): yes/no >= 80% overall (78.3%), and
grounding: Acc@0.5 >= 30% and 15 points above the best image-blind rule (the best box per position phrase: 7.75%
against the model's 5.0%). Nor is the recipe's robustness across seeds and CPUs: the yes/no, pair and box thresholds
sit inside that spread. Of the seven runs of the recipe so far (seeds 0-4 on the first machine, seeds 0 and 1 on a
Xeon with AMX, whose bfloat16 kernels round differently), these assertions hold on two (seeds 0 and 3 of the first
machine), so a fresh run on another machine is more likely to fail than to pass (docs/LOG.md, 2026-12-05 (fourth
session)); see the README's table and the runs beside it. The `--fast` demo (tests/test_demo.py) is too short for
any of this.
"""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

import pytest

from mllm.cli import main
from mllm.demo.config import demo_config
from mllm.demo.metrics import METRICS_KEYS, metric

ROOT = Path(__file__).resolve().parents[1]
COMMITTED_RUNS = ROOT / "docs" / "results" / "demo_seeds" / "2026-12-05"
"""One JSON file per seed 0-4 (`seed<N>.json`: the run's `demo_config`, stage times and summaries, `metrics`),
made with bfloat16 autocast on 2 cores with avx512_bf16."""
OTHER_CPU_RUNS = ROOT / "docs" / "results" / "demo_seeds" / "2026-12-05-amx"
"""The same recipe on another 2-core Xeon (AMX; `seed<N>.json` in the same layout, plus `machine`): its bfloat16
kernels round differently, so each run there is another draw of the recipe, quoted in the README beside the table."""
PROBES = ROOT / "docs" / "results" / "demo_probes" / "2026-12-05-amx"
"""Raw results of probes the README quotes (not the recipe)."""
SEEDS = range(5)

P_VALUE = 0.01
MIN_YES_NO = 0.75
"""Measured 0.773 on seed 0, 0.783 with the `questions` stage (issue 26 asks for 0.80: not reached)."""
MIN_CATEGORY = 0.65
"""Issue 26's value; measured at least 0.693 on seed 0 (0.687 with the `questions` stage)."""
MIN_PAIR_ACCURACY = 0.60
"""Issue 26's value; measured 0.617 on seed 0 (0.620 with the `questions` stage)."""
MIN_GROUNDING_P = 0.05
"""One-sided McNemar p of the boxes against the mean training box; measured 0.002 (0.018 with the `questions`
stage)."""
MAX_GREEDY_CHAIRI = 0.10
MAX_SAMPLED_CHAIRI_RATIO = 0.70
MAX_RECALL_DROP = 0.05
MAX_PREFERENCE_DROP = 0.03


def committed_run(seed: int) -> dict:
    return json.loads((COMMITTED_RUNS / f"seed{seed}.json").read_text())


@pytest.fixture(
    scope="module",
    params=["committed", pytest.param("fresh", marks=[pytest.mark.full_demo, pytest.mark.slow])],
)
def metrics(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """`metrics.json` of seed 0's full demo: the committed run, or (with `--full-demo`) one run now."""
    if request.param == "committed":
        return committed_run(0)["metrics"]
    out = tmp_path_factory.mktemp("demo") / "full"
    assert main(["demo", "--out", str(out)]) == 0
    return json.loads((out / "metrics.json").read_text())


def test_full_demo_writes_every_part_1_metric(metrics: dict) -> None:
    for name in ("after_sft", "after_preference"):
        block = metrics[name]
        for key in METRICS_KEYS:
            value = metric(block, key)
            assert isinstance(value, float) and 0.0 <= value <= 1.0, (name, key, value)
        yes_no, grounding = block["yes_no"], block["grounding"]
        assert yes_no["n"] == 600 and yes_no["pairs"] == 300 and grounding["n"] == 400
        assert yes_no["ci95"][0] <= yes_no["accuracy"] <= yes_no["ci95"][1]
        assert grounding["ci95"][0] <= grounding["acc"] <= grounding["ci95"][1]
        assert set(yes_no["blind"]) == {
            "majority per category",
            "majority per question template",
            "majority per question",
        }
        assert {"mean training box", "best constant box", "best box per position phrase"} <= set(
            grounding["blind"]
        )
        assert yes_no["blind_accuracy"] == max(c["baseline_accuracy"] for c in yes_no["blind"].values())
        assert grounding["blind_acc"] == max(c["baseline_accuracy"] for c in grounding["blind"].values())


def test_full_demo_answers_yes_no_better_than_every_image_blind_rule(metrics: dict) -> None:
    yes_no = metrics["after_sft"]["yes_no"]
    assert yes_no["accuracy"] >= MIN_YES_NO, yes_no["accuracy"]
    for name, comparison in yes_no["blind"].items():
        assert comparison["model_correct"] > comparison["baseline_correct"], name
        assert comparison["p_model_better"] < P_VALUE, (name, comparison)
    assert yes_no["pair_accuracy"] >= MIN_PAIR_ACCURACY, yes_no["pair_accuracy"]
    assert set(yes_no["per_category"]) == {"color", "count", "existence", "position"}
    for name, category in yes_no["per_category"].items():
        assert category["accuracy"] >= MIN_CATEGORY and category["p_chance"] < P_VALUE, (name, category)


def test_full_demo_boxes_beat_the_mean_training_box(metrics: dict) -> None:
    mean_box = metrics["after_sft"]["grounding"]["blind"]["mean training box"]
    assert mean_box["model_correct"] > mean_box["baseline_correct"]
    assert mean_box["p_model_better"] < MIN_GROUNDING_P, mean_box


def test_full_demo_hallucinates_less_after_preference_training(metrics: dict) -> None:
    before, after = metrics["after_sft"], metrics["after_preference"]
    assert before["chair"]["greedy"]["CHAIRi"] <= MAX_GREEDY_CHAIRI
    sampled_before, sampled_after = before["chair"]["sampled"], after["chair"]["sampled"]
    assert sampled_after["CHAIRi"] <= MAX_SAMPLED_CHAIRI_RATIO * sampled_before["CHAIRi"], (before, after)
    assert sampled_after["Recall"] >= sampled_before["Recall"] - MAX_RECALL_DROP
    assert after["yes_no"]["accuracy"] >= before["yes_no"]["accuracy"] - MAX_PREFERENCE_DROP
    assert after["grounding"]["acc"] >= before["grounding"]["acc"] - MAX_PREFERENCE_DROP


def committed_run_files() -> list[Path]:
    return [COMMITTED_RUNS / f"seed{seed}.json" for seed in SEEDS] + sorted(OTHER_CPU_RUNS.glob("seed*.json"))


@pytest.mark.parametrize("path", committed_run_files(), ids=lambda path: f"{path.parent.name}/{path.stem}")
def test_the_committed_runs_are_the_recipe_the_code_runs(path: Path) -> None:
    run = json.loads(path.read_text())
    seed = int(path.stem.removeprefix("seed"))
    assert run["seed"] == run["metrics"]["seed"] == seed and not run["metrics"]["fast"]
    # every field that decides results; `bf16` is what they resolved to (autocast, on both machines)
    assert run["demo_config"] == demo_config(seed=seed, bf16=True).fingerprint()


def percent(value: float, digits: int) -> str:
    return f"{100 * value:.{digits}f}"


def quoted_figures(sft: dict) -> dict[str, str]:
    """The after-SFT figures as the README writes them."""
    categories = ("color", "count", "existence", "position")
    return {
        "yes_no": percent(sft["yes_no"]["accuracy"], 1),
        "categories": " / ".join(
            percent(sft["yes_no"]["per_category"][c]["accuracy"], 1) for c in categories
        ),
        "pairs": percent(sft["yes_no"]["pair_accuracy"], 1),
        "acc": percent(sft["grounding"]["acc"], 2),
        "greedy_chairi": percent(sft["chair"]["greedy"]["CHAIRi"], 1),
    }


def test_the_readme_table_of_seeds_is_the_committed_runs() -> None:
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("| seed | yes/no [95% CI] |") :].split("\n\n")[0]
    rows = {int(m[1]): m[2].split(" | ") for m in re.finditer(r"^\| (\d) \| (.*) \|$", table, flags=re.M)}
    assert sorted(rows) == list(SEEDS)
    yes_no, pairs = [], []
    for seed in SEEDS:
        sft = committed_run(seed)["metrics"]["after_sft"]
        cells = rows[seed]
        yes_no.append(100 * sft["yes_no"]["accuracy"])
        pairs.append(100 * sft["yes_no"]["pair_accuracy"])
        quoted = quoted_figures(sft)
        assert cells[0].startswith(quoted["yes_no"] + " "), (seed, cells[0])
        assert cells[1] == quoted["categories"], (seed, cells[1])
        assert cells[2] == quoted["pairs"], seed
        assert cells[4] == quoted["acc"], seed
        assert cells[6] == quoted["greedy_chairi"], seed
    summary = f"yes/no **{statistics.mean(yes_no):.1f}%** (sd {statistics.stdev(yes_no):.1f}"
    assert summary in readme
    assert f"pair accuracy **{statistics.mean(pairs):.1f}%** (sd {statistics.stdev(pairs):.1f}" in readme


def test_the_readme_quotes_the_runs_on_the_other_cpu() -> None:
    readme = (ROOT / "README.md").read_text()
    paragraph = " ".join(
        readme[readme.index("**The same recipe on another CPU**") :].split("\n\n")[0].split()
    )
    paths = sorted(OTHER_CPU_RUNS.glob("seed*.json"))
    assert paths
    for path in paths:
        quoted = quoted_figures(json.loads(path.read_text())["metrics"]["after_sft"])
        line = (
            f"{path.stem.replace('seed', 'seed ')}: yes/no {quoted['yes_no']}% ({quoted['categories']}), pairs "
            f"{quoted['pairs']}%, Acc@0.5 {quoted['acc']}%, greedy CHAIRi {quoted['greedy_chairi']}%"
        )
        assert line in paragraph, line


def test_the_readme_quotes_the_box_bins_probe() -> None:
    readme = " ".join((ROOT / "README.md").read_text().split())
    probe = json.loads((PROBES / "rec_box_bins.json").read_text())
    binned, exact = probe["boxes_in_20_bins"]["grounding"], probe["exact_boxes"]["grounding"]
    paired = probe["binned_against_exact"]
    assert (paired["model_correct"], paired["baseline_correct"]) == (binned["correct"], exact["correct"])
    quoted = (
        f"20 bins gave Acc@0.5 {percent(binned['acc'], 1)}% against {percent(exact['acc'], 2)}% with exact boxes "
        f"on the same {binned['n']} expressions (McNemar p {paired['p_value']:.3f};"
    )
    assert quoted in readme, quoted
    snapped = probe["snapped_to_20_bins"]
    assert all(s["iou_ge_0.5_after_snapping"] == s["records"] for s in snapped.values())
    assert "every box of that world stays at IoU >= 0.5 when snapped" in readme


def test_the_readme_quotes_the_rec_probe() -> None:
    readme = " ".join((ROOT / "README.md").read_text().split())
    probe = json.loads((PROBES / "rec_only.json").read_text())
    alone = probe["rec_only_2400_from_questions"]
    blind = alone["grounding"]["blind"]["best box per position phrase"]
    quoted = (
        f"reach Acc@0.5 {percent(alone['grounding']['acc'], 2)}%: {blind['model_correct']} of "
        f"{alone['grounding']['n']} against {blind['baseline_correct']} for the best image-blind box rule"
    )
    assert quoted in readme, quoted
    # the README calls the per-phrase rule the best image-blind one: it must be
    assert blind["baseline_accuracy"] == alone["grounding"]["blind_acc"]
    assert f"(yes/no {percent(alone['other_skills_after']['yes_no_accuracy'], 0)}%)" in readme
