"""A training run that has gone non-finite ends with an error, not with a saved model and exit status 0.

Trainer does not stop by itself: a NaN loss is left out of the logged mean (`logging_nan_inf_filter`, so the log
shows 0.0), and the run trains on and saves weights that are all NaN. Seen on 2026-12-06 (docs/LOG.md): Trainer's
`--torch-compile` with the inductor backend under CPU bfloat16 autocast made every logit NaN from the first step;
the demo's `questions` stage logged "loss 0.000 -> 0.000" for 1,000 steps and saved the model. The check reads only
what Trainer logs (no extra synchronisation per step): the gradient norm, which Trainer (5.x) computes at every
optimizer step, with `max_grad_norm` 0 (no clipping) too, and the logged loss.
"""

from __future__ import annotations

import math

from transformers import TrainerCallback


class StopOnNonFinite(TrainerCallback):
    """Raise FloatingPointError at the first logged `grad_norm` or `loss` that is NaN or infinite (every process of
    a distributed run logs the same reduced figures, so all of them stop)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key in ("grad_norm", "loss"):
            value = (logs or {}).get(key)
            if isinstance(value, (int, float)) and not math.isfinite(value):
                raise FloatingPointError(
                    f"{args.output_dir}: step {state.global_step}: the logged {key} is {value}: training has gone "
                    "non-finite (a learning rate too high, fp16 overflow, or a wrong compiled kernel); stopped "
                    "without saving the model. Checkpoints saved after it went non-finite are unusable."
                )
        return control
