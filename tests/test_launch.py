"""Training in several CPU processes (`mllm.train.launch.run_in_processes`, DDP over gloo): one step of two
processes on half a batch each is the step of one process on the whole batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers.data_files import make_sft_files
from helpers.training import cpu_training_args


def sgd_step(model_dir: str, data: str, out: str, per_device_batch: int) -> dict:
    """One plain-SGD step of `mllm train sft`'s Trainer on all of `data`; saves the model to out/model (rank 0).
    Module-level so that spawned processes can import it."""
    from mllm.train.sft import DataArguments, ModelArguments, build_sft_trainer

    torch.manual_seed(0)
    trainer = build_sft_trainer(
        ModelArguments(model=model_dir, attn_implementation="eager"),
        DataArguments(data=data),
        cpu_training_args(
            Path(out),
            per_device_train_batch_size=per_device_batch,
            max_steps=1,
            optim="sgd",
            learning_rate=0.5,
            max_grad_norm=0.0,  # no clipping: it would hide a wrongly scaled gradient
        ),
    )
    trainer.train()
    trainer.save_model(str(Path(out) / "model"))
    return {"processes": trainer.accelerator.num_processes, "steps": trainer.state.global_step}


def test_two_processes_take_the_step_of_one_process_on_the_whole_batch(
    tmp_path: Path, small_model_dir: Path
) -> None:
    from safetensors.torch import load_file

    from mllm.train.launch import run_in_processes

    data = make_sft_files(
        tmp_path / "d", 8, long_no=True
    )  # answers of different lengths: the token mean matters
    one = run_in_processes(sgd_step, (str(small_model_dir), str(data), str(tmp_path / "one"), 8), processes=1)
    two = run_in_processes(sgd_step, (str(small_model_dir), str(data), str(tmp_path / "two"), 4), processes=2)
    assert one == {"processes": 1, "steps": 1} and two == {"processes": 2, "steps": 1}
    start = load_file(small_model_dir / "model.safetensors")
    a, b = (load_file(tmp_path / run / "model" / "model.safetensors") for run in ("one", "two"))
    moved = [name for name in start if not torch.equal(a[name], start[name])]
    assert moved  # the step changed the weights
    for name in moved:
        # the same update, not half of it (DDP averages the processes' gradients of a loss over all their tokens)
        torch.testing.assert_close(
            b[name] - start[name], a[name] - start[name], rtol=1e-3, atol=1e-6, msg=name
        )


def test_an_error_in_a_process_reaches_the_caller() -> None:
    from mllm.train.launch import run_in_processes

    with pytest.raises(Exception, match="processes must be at least 1"):
        run_in_processes(run_in_processes, (print, (), 0), processes=2)


def big_result(size: int) -> dict:
    """Module-level, for spawned processes: a result larger than a pipe's buffer."""
    return {"values": list(range(size))}


def test_a_result_larger_than_a_pipe_comes_back() -> None:
    from mllm.train.launch import run_in_processes

    assert run_in_processes(big_result, (200_000,), processes=2)["values"][-1] == 199_999
