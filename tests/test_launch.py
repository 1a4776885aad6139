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


def deaf_sleep(seconds: float) -> None:
    """Module-level, for spawned processes: a process that ignores SIGINT (as one whose KeyboardInterrupt was lost)."""
    import signal
    import time

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    time.sleep(seconds)


def test_training_processes_die_with_a_killed_parent() -> None:
    """SIGKILL of the caller kills its processes even when they would not stop on torch's SIGINT."""
    import os
    import signal
    import subprocess
    import sys
    import time

    code = "from mllm.train.launch import run_in_processes; import test_launch; "
    code += "run_in_processes(test_launch.deaf_sleep, (300,), processes=2)"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]),
    }
    parent = subprocess.Popen([sys.executable, "-c", code], env=env)
    children_file = Path(f"/proc/{parent.pid}/task/{parent.pid}/children")
    deadline = time.monotonic() + 120
    children: list[str] = []
    while len(children) < 2:
        assert parent.poll() is None and time.monotonic() < deadline, "the two processes did not start"
        time.sleep(0.2)
        children = children_file.read_text().split()
    time.sleep(3)  # past the processes' start-up (their SIGINT is ignored from here on)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 30
    alive = children
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        alive = [pid for pid in children if _running(pid)]
    for pid in alive:
        os.kill(int(pid), signal.SIGKILL)
    assert not alive, f"processes {alive} trained on after their parent was killed"


def _running(pid: str) -> bool:
    """Whether process `pid` exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_a_torchrun_worker_leaves_with_its_code_after_flushing() -> None:
    """Under torchrun (TORCHELASTIC_RUN_ID set) `leave_torchrun_worker` ends the process at once with the code, the
    piped (block-buffered) output flushed first; elsewhere it returns."""
    import os
    import subprocess
    import sys

    script = (
        "import logging, sys\n"
        "from mllm.train.launch import leave_torchrun_worker\n"
        "logging.basicConfig(stream=sys.stderr)\n"
        "print('saved')\n"
        "logging.getLogger('x').warning('logged')\n"
        "leave_torchrun_worker(3)\n"
        "print('returned')\n"
    )
    buffered = {k: v for k, v in os.environ.items() if k not in ("PYTHONUNBUFFERED", "TORCHELASTIC_RUN_ID")}
    worker = subprocess.run(
        [sys.executable, "-c", script],
        env={**buffered, "TORCHELASTIC_RUN_ID": "test"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (worker.returncode, worker.stdout) == (3, "saved\n") and "logged" in worker.stderr
    env = {k: v for k, v in os.environ.items() if k != "TORCHELASTIC_RUN_ID"}
    alone = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert (alone.returncode, alone.stdout) == (0, "saved\nreturned\n")


def test_python_m_mllm_under_torchrun_leaves_through_the_worker_exit() -> None:
    """`python -m mllm` (what torchrun starts) ends through `run_command`: under torchrun the worker leaves by
    `os._exit` (no exit handler runs) after the help it printed for a missing command is flushed, with the command's
    code (2); elsewhere the interpreter exits as usual."""
    import os
    import subprocess
    import sys

    script = (
        "import atexit, runpy, sys\n"
        "atexit.register(lambda: print('exit handlers ran'))\n"
        "sys.argv = ['mllm']\n"
        "runpy.run_module('mllm', run_name='__main__')\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONUNBUFFERED", "TORCHELASTIC_RUN_ID")}
    runs = {
        name: subprocess.run(
            [sys.executable, "-c", script], env=extra | env, capture_output=True, text=True, timeout=120
        )
        for name, extra in (("torchrun", {"TORCHELASTIC_RUN_ID": "test"}), ("alone", {}))
    }
    assert [r.returncode for r in runs.values()] == [2, 2]
    assert all("usage: mllm" in r.stdout for r in runs.values())
    assert "exit handlers ran" not in runs["torchrun"].stdout and "exit handlers ran" in runs["alone"].stdout
