"""Small pure statistics for evaluation reports: intervals, exact tests, paired comparisons, pair accuracy.

    proportion_interval(83, 150)                      # 95% Clopper-Pearson interval of 83/150
    binomial_p_value(356, 600, 0.5)                   # one-sided: P(X >= 356) under chance
    mcnemar(model_correct, baseline_correct)          # exact paired test on the same items
    pair_accuracy(correct, pair_keys)                 # MME's acc+: both questions of a pair right

Why exact tests: a skeptic's first questions about "the model beats the baseline" are whether the two were scored on
the same items (then the comparison must be paired: McNemar's test looks only at the items where they disagree) and
whether the baseline's rate was itself measured (a binomial test against a measured rate treats it as known and
overstates the evidence). The binomial computations are scipy's (`scipy.stats.binomtest`).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import asdict, dataclass
from typing import Any


def proportion_interval(successes: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Exact (Clopper-Pearson) two-sided `level` interval of a proportion; (0, 1) when n is 0."""
    from scipy.stats import binomtest

    if n == 0:
        return 0.0, 1.0
    interval = binomtest(successes, n).proportion_ci(confidence_level=level, method="exact")
    return float(interval.low), float(interval.high)


def binomial_p_value(successes: int, n: int, p: float, alternative: str = "greater") -> float:
    """Exact binomial test of `successes` out of `n` against rate `p` ("greater": P(X >= successes))."""
    from scipy.stats import binomtest

    if n == 0:
        return 1.0
    return float(binomtest(successes, n, p, alternative=alternative).pvalue)


@dataclass
class PairedComparison:
    """Two scorers (a model and a baseline) on the same items: counts and McNemar's exact test."""

    n: int
    """Items scored by both."""
    model_correct: int
    baseline_correct: int
    model_only: int
    """Items the model gets right and the baseline wrong (b)."""
    baseline_only: int
    """Items the baseline gets right and the model wrong (c)."""
    p_value: float
    """Exact two-sided McNemar p-value: binomial test of b against b + c at 1/2."""
    p_model_better: float
    """Exact one-sided p-value for "the model is right more often": P(B >= b) with B ~ Bin(b + c, 1/2)."""

    @property
    def model_accuracy(self) -> float:
        return self.model_correct / self.n if self.n else 0.0

    @property
    def baseline_accuracy(self) -> float:
        return self.baseline_correct / self.n if self.n else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "model_accuracy": self.model_accuracy,
            "baseline_accuracy": self.baseline_accuracy,
        }


def mcnemar(model_correct: Sequence[bool], baseline_correct: Sequence[bool]) -> PairedComparison:
    """McNemar's exact test of a model against a baseline scored on the same items (in the same order)."""
    if len(model_correct) != len(baseline_correct):
        raise ValueError(
            f"paired test needs the same items: {len(model_correct)} model scores, {len(baseline_correct)} baseline"
        )
    pairs = [(bool(m), bool(b)) for m, b in zip(model_correct, baseline_correct)]
    b = sum(m and not base for m, base in pairs)
    c = sum(base and not m for m, base in pairs)
    return PairedComparison(
        n=len(pairs),
        model_correct=sum(m for m, _ in pairs),
        baseline_correct=sum(base for _, base in pairs),
        model_only=b,
        baseline_only=c,
        p_value=binomial_p_value(b, b + c, 0.5, "two-sided"),
        p_model_better=binomial_p_value(b, b + c, 0.5, "greater"),
    )


@dataclass
class PairAccuracy:
    """MME's pair metric (acc+): a pair counts only when every question of it is answered right."""

    pairs: int
    """Pairs with at least two questions (single questions are left out)."""
    both_right: int
    same_answer: int
    """Pairs whose questions all got the same normalised answer (a model that ignores the question)."""

    @property
    def accuracy(self) -> float:
        return self.both_right / self.pairs if self.pairs else 0.0


def pair_accuracy(
    correct: Sequence[bool], pair_keys: Sequence[Hashable], answers: Sequence[str] | None = None
) -> PairAccuracy:
    """Group the questions by `pair_keys` (MME pairs its questions by image) and count the pairs whose questions are
    all right; with `answers`, also the pairs answered alike throughout."""
    if len(correct) != len(pair_keys) or (answers is not None and len(answers) != len(correct)):
        raise ValueError("pair_accuracy needs one correctness flag, key (and answer) per question")
    groups: dict[Hashable, list[int]] = {}
    for index, key in enumerate(pair_keys):
        groups.setdefault(key, []).append(index)
    pairs = [members for members in groups.values() if len(members) >= 2]
    both = sum(all(correct[i] for i in members) for members in pairs)
    same = 0
    if answers is not None:
        same = sum(len({answers[i] for i in members}) == 1 for members in pairs)
    return PairAccuracy(pairs=len(pairs), both_right=both, same_answer=same)
