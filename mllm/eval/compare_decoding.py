"""Compare decoding strategies (greedy, sampling, beam) on one question file by CHAIR hallucination and length.

For each strategy the answers are generated through `mllm.eval.answer.generate_answers` into
`<out-dir>/answers_<strategy>.jsonl`, so a killed comparison resumes where it stopped (finished answers are skipped).
Beside each answers file, `answers_<strategy>.meta.json` records the settings that made it (model, question file,
generation kwargs, seed) and the generation time summed over all runs: a rerun with other settings is refused rather
than mixing two kinds of answers in one file, and the reported seconds stay honest across resumes (they count model
time only, measured around each batch).

Every strategy is scored by the same evaluator (ground truth loaded once) and the results are written as
`decoding_comparison.md` (a table), `decoding_comparison.json` and `decoding_comparison.png` (a bar chart), plus
the per-caption CHAIR details in `chair_<strategy>.json`. Those are derived from the answers and rewritten each run.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mllm.eval.answer import QuestionItem, generate_answers
from mllm.eval.chair import CHAIREvaluator, read_answers, score_answers
from mllm.files import write_json_atomic
from mllm.model.chat import STRATEGIES, decoding_kwargs

logger = logging.getLogger(__name__)

AnswerFn = Callable[[list[QuestionItem]], tuple[list[str], int]]
AnswerFnFactory = Callable[[str, dict[str, Any]], AnswerFn]
"""(strategy, generation kwargs) -> a batch answer function; it may seed its random generator here."""

REPORT_STEM = "decoding_comparison"
SETTINGS_KEYS = ("model", "questions", "generation_kwargs", "seed")


@dataclass
class ComparisonSettings:
    """What makes one strategy's answers comparable with another run's (checked on resume)."""

    model: str
    questions: str
    seed: int
    max_new_tokens: int
    batch_size: int = 1
    limit: int | None = None


@dataclass
class StrategyResult:
    """One row of the comparison table. CHAIR values are fractions (the table prints them x 100)."""

    strategy: str
    answers: int
    chair_s: float
    chair_i: float
    recall: float
    len: float
    mean_words: float
    seconds: float
    new_tokens: int
    answers_path: str
    chair_path: str
    generation_kwargs: dict[str, Any]

    @property
    def items_per_second(self) -> float:
        return self.answers / self.seconds if self.seconds else 0.0


def validate_strategies(strategies: Sequence[str]) -> list[str]:
    """Known, distinct strategy names, in the order given (the table keeps it)."""
    if not strategies:
        raise ValueError("--strategies: give at least one of " + ", ".join(STRATEGIES))
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        raise ValueError(f"--strategies: unknown {unknown}; choose from {', '.join(STRATEGIES)}")
    if len(set(strategies)) != len(strategies):
        raise ValueError(f"--strategies: a strategy is listed twice: {strategies}")
    return list(strategies)


def read_meta(meta_path: Path, answers_path: Path, expected: dict[str, Any]) -> dict[str, Any]:
    """The sidecar of an existing answers file, checked against this run's settings; a fresh one otherwise.

    Answers made with other settings (or of unknown origin) are never extended: the error names the file."""
    if not meta_path.exists():
        if answers_path.exists() and answers_path.stat().st_size > 0:
            raise ValueError(
                f"--out-dir: {answers_path} exists without {meta_path.name}, so its settings are unknown; "
                "move it away or use another --out-dir"
            )
        return {**expected, "seconds": 0.0, "new_tokens": 0}
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{meta_path}: not valid JSON ({exc})") from exc
    differing = [key for key in SETTINGS_KEYS if meta.get(key) != expected[key]]
    if differing:
        details = "; ".join(f"{k}: was {meta.get(k)!r}, now {expected[k]!r}" for k in differing)
        raise ValueError(
            f"--out-dir: {answers_path} was made with other settings ({details}); "
            "use another --out-dir to compare these settings"
        )
    return meta


def timed_answer_fn(answer_fn: AnswerFn, meta: dict[str, Any], meta_path: Path) -> AnswerFn:
    """Wrap `answer_fn` so that model time and new tokens are added to the sidecar after every batch, which keeps
    the totals right when a run is killed and resumed."""

    def answer(batch: list[QuestionItem]) -> tuple[list[str], int]:
        start = time.perf_counter()
        texts, n_tokens = answer_fn(batch)
        meta["seconds"] = float(meta.get("seconds", 0.0)) + time.perf_counter() - start
        meta["new_tokens"] = int(meta.get("new_tokens", 0)) + int(n_tokens)
        write_json_atomic(meta_path, meta)
        return texts, n_tokens

    return answer


def answered_indices(answers_path: Path) -> list[int]:
    """The `idx` of every non-blank line, in file order (the order `read_answers` returns them in)."""
    with answers_path.open(encoding="utf-8") as handle:
        return [int(json.loads(line)["idx"]) for line in handle if line.strip()]


def score_strategy(
    evaluator: CHAIREvaluator, answers_path: Path, limit: int | None
) -> tuple[dict[str, Any], list[str]]:
    """CHAIR of one answers file (only idx < limit when a limit is given, so that a rerun with a smaller --limit
    still compares the same items across strategies) and the captions scored."""
    answers = read_answers(answers_path)
    if limit is not None:
        keep = [idx < limit for idx in answered_indices(answers_path)]
        answers = [answer for answer, kept in zip(answers, keep) if kept]
    if not answers:
        raise ValueError(
            f"{answers_path}: no answers to score (did every question fail? see its .errors.jsonl)"
        )
    return score_answers(evaluator, answers), [answer.caption for answer in answers]


def run_strategy(
    strategy: str,
    questions: Path,
    out_dir: Path,
    make_answer_fn: AnswerFnFactory,
    evaluator: CHAIREvaluator,
    settings: ComparisonSettings,
) -> StrategyResult:
    """Generate (or finish) one strategy's answers, then score them."""
    kwargs = decoding_kwargs(strategy, max_new_tokens=settings.max_new_tokens)
    answers_path = out_dir / f"answers_{strategy}.jsonl"
    meta_path = out_dir / f"answers_{strategy}.meta.json"
    expected = {
        "strategy": strategy,
        "model": settings.model,
        "questions": str(questions.resolve()),
        "generation_kwargs": kwargs,
        "seed": settings.seed if kwargs.get("do_sample") else None,  # only sampling depends on it
    }
    meta = read_meta(meta_path, answers_path, expected)
    write_json_atomic(meta_path, meta)
    inner_fn = make_answer_fn(strategy, kwargs)
    answer_fn = timed_answer_fn(inner_fn, meta, meta_path)
    logger.info("decoding comparison: %s (%s)", strategy, kwargs)
    summary = generate_answers(
        questions,
        answers_path,
        answer_fn,
        Path(settings.model).name,
        settings.batch_size,
        settings.limit,
        length_fn=getattr(inner_fn, "prompt_length", None),  # length bucketing when the model offers it
    )
    logger.info("%s: %s", strategy, summary.line())
    result, captions = score_strategy(evaluator, answers_path, settings.limit)
    chair_path = out_dir / f"chair_{strategy}.json"
    write_json_atomic(chair_path, result)
    overall = result["overall_metrics"]
    return StrategyResult(
        strategy=strategy,
        answers=len(captions),
        chair_s=overall["CHAIRs"],
        chair_i=overall["CHAIRi"],
        recall=overall["Recall"],
        len=overall["Len"],
        mean_words=sum(len(c.split()) for c in captions) / len(captions),
        seconds=float(meta["seconds"]),
        new_tokens=int(meta["new_tokens"]),
        answers_path=str(answers_path),
        chair_path=str(chair_path),
        generation_kwargs=kwargs,
    )


def compare_decoding(
    questions: str | Path,
    out_dir: str | Path,
    make_answer_fn: AnswerFnFactory,
    evaluator: CHAIREvaluator,
    settings: ComparisonSettings,
    strategies: Sequence[str] = STRATEGIES,
) -> list[StrategyResult]:
    """Answers + CHAIR for each strategy, then the markdown/JSON/PNG report in `out_dir`."""
    questions, out_dir = Path(questions), Path(out_dir)
    if not questions.is_file():
        raise ValueError(f"--questions: file not found: {questions}")
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out-dir: {out_dir} exists and is not a folder")
    strategies = validate_strategies(strategies)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = [
        run_strategy(strategy, questions, out_dir, make_answer_fn, evaluator, settings)
        for strategy in strategies
    ]
    write_report(results, out_dir, settings, evaluator)
    return results


def markdown_table(results: list[StrategyResult]) -> str:
    """The comparison table; CHAIR metrics and Len x 100 with one decimal, as the reference prints them."""
    lines = [
        "| strategy | answers | CHAIRs | CHAIRi | Recall | Len | mean words | seconds | items/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.strategy} | {r.answers} | {r.chair_s * 100:.1f} | {r.chair_i * 100:.1f} | "
            f"{r.recall * 100:.1f} | {r.len * 100:.1f} | {r.mean_words:.1f} | {r.seconds:.1f} | "
            f"{r.items_per_second:.2f} |"
        )
    return "\n".join(lines)


def write_report(
    results: list[StrategyResult], out_dir: Path, settings: ComparisonSettings, evaluator: CHAIREvaluator
) -> None:
    """decoding_comparison.md / .json / .png (derived files: rewritten on every run)."""
    info = {
        "settings": asdict(settings),
        "nlp_backend": evaluator.lemmatizer.name,
        "vocabulary": evaluator.vocabulary.source,
        "ground_truth": evaluator.ground_truth_info,
    }
    header = [
        "# Decoding strategies compared",
        "",
        f"Model `{settings.model}`, questions `{settings.questions}`, max_new_tokens {settings.max_new_tokens}, "
        f"seed {settings.seed}; CHAIR with the `{info['nlp_backend']}` backend and the "
        f"`{info['vocabulary']}` vocabulary. CHAIRs/CHAIRi/Recall in %, Len = mean CHAIR tokens, "
        "seconds = model time summed over all runs.",
        "",
    ]
    text = "\n".join([*header, markdown_table(results)]) + "\n"
    (out_dir / f"{REPORT_STEM}.md").write_text(text, encoding="utf-8")
    payload = {**info, "results": [{**asdict(r), "items_per_second": r.items_per_second} for r in results]}
    write_json_atomic(out_dir / f"{REPORT_STEM}.json", payload)
    plot_comparison(results, out_dir / f"{REPORT_STEM}.png")


def plot_comparison(results: list[StrategyResult], path: Path) -> None:
    """Grouped bars of CHAIRs, CHAIRi and Recall (%) per strategy, and mean answer words beside them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r.strategy for r in results]
    metrics = {
        "CHAIRs": [r.chair_s * 100 for r in results],
        "CHAIRi": [r.chair_i * 100 for r in results],
        "Recall": [r.recall * 100 for r in results],
    }
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), gridspec_kw={"width_ratios": [3, 1.4]})
    width = 0.8 / len(metrics)
    for k, (label, values) in enumerate(metrics.items()):
        positions = [i + (k - (len(metrics) - 1) / 2) * width for i in range(len(names))]
        bars = left.bar(positions, values, width, label=label)
        left.bar_label(bars, fmt="%.1f", fontsize=7)
    left.set_xticks(range(len(names)), names)
    left.set_ylabel("%")
    left.set_title("CHAIR by decoding strategy (lower CHAIR = less hallucination)")
    left.legend()
    bars = right.bar(names, [r.mean_words for r in results], color="gray")
    right.bar_label(bars, fmt="%.1f", fontsize=7)
    right.set_title("mean words per answer")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
