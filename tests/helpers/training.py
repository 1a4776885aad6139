"""TrainingArguments for tiny deterministic CPU training runs in tests."""

from __future__ import annotations

from pathlib import Path


def cpu_training_args(out: Path, **overrides):
    """Deterministic CPU settings (constant lr, no warm-up or decay, no saving, every step logged); keyword
    arguments override any TrainingArguments field."""
    from mllm.train.runner import MLLMTrainingArguments

    base = dict(
        output_dir=str(out),
        per_device_train_batch_size=4,
        learning_rate=2e-3,
        num_train_epochs=1,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
    )
    base.update(overrides)
    return MLLMTrainingArguments(**base)


def distributed_env(**extra: str) -> dict[str, str]:
    """Environment for `torchrun` / script launches on CPU: one thread per process, DeepSpeed's CPU accelerator
    (without Intel's oneCCL bindings installed it talks over torch's gloo backend), and this interpreter's bin folder
    first on PATH so that `mllm` and `torchrun` are the project's."""
    import os
    import sys

    bin_dir = str(Path(sys.executable).parent)
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "DS_ACCELERATOR": "cpu",
        "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
        **extra,
    }


def torchrun(processes: int, *args: str) -> list[str]:
    """`torchrun --nproc_per_node N --master_port <free> ARGS...` through this interpreter."""
    import sys

    from mllm.train.launch import free_port

    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(processes),
        "--master_port",
        str(free_port()),
        *args,
    ]


def kill_tree(pid: int) -> None:
    """SIGKILL a process and every descendant at once (torchrun starts its workers in sessions of their own, so a
    process-group kill would leave them running): what an out-of-memory kill or a lost node does to a job."""
    import psutil

    root = psutil.Process(pid)
    for process in [*root.children(recursive=True), root]:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
