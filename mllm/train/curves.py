"""Loss and reward curves from a Trainer's `trainer_state.json`, as PNG."""

from __future__ import annotations

import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.json"


def read_log_history(run_dir: str | Path) -> list[dict]:
    """The `log_history` of the newest trainer_state.json in a run directory (or its checkpoints)."""
    run_dir = Path(run_dir)
    candidates = [run_dir / TRAINER_STATE, *run_dir.glob(f"checkpoint-*/{TRAINER_STATE}")]
    candidates = [p for p in candidates if p.is_file()]
    if not candidates:
        raise ValueError(f"{run_dir}: no {TRAINER_STATE} found (is this a training output directory?)")
    newest = max(candidates, key=lambda p: json.loads(p.read_text())["global_step"])
    return json.loads(newest.read_text())["log_history"]


def series(history: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(row["step"], row[key]) for row in history if key in row]
    return [s for s, _ in points], [v for _, v in points]


def plot_curves(
    run_dir: str | Path, keys: list[str] | None = None, out_png: str | Path | None = None
) -> Path:
    """Plot the logged values named in `keys` (default: train and eval loss) against step; returns the PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history = read_log_history(run_dir)
    keys = keys or ["loss", "eval_loss"]
    out_png = Path(out_png) if out_png else Path(run_dir) / "loss_curves.png"
    fig, ax = plt.subplots(figsize=(7, 4))
    plotted = 0
    for key in keys:
        steps, values = series(history, key)
        if steps:
            ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=key)
            plotted += 1
    if not plotted:
        plt.close(fig)
        raise ValueError(f"{run_dir}: none of {keys} was logged")
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(Path(run_dir).name)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def plot_curves_after_training(
    run_dir: str | Path, keys: list[str] | None = None, out_png: str | Path | None = None
) -> Path | None:
    """`plot_curves` at the end of a training run: a run that logged nothing to plot (fewer steps than
    --logging-steps) still succeeded, its model is saved, so that is a warning and None, not an error."""
    try:
        return plot_curves(run_dir, keys, out_png)
    except ValueError as exc:
        logger.warning("no curves: %s", exc)
        return None
