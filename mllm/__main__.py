"""`python -m mllm ...` (also what `torchrun -m mllm ...` runs)."""

from mllm.cli import main

if __name__ == "__main__":
    code = main()
    from mllm.train.launch import leave_torchrun_worker

    leave_torchrun_worker(code)  # a torchrun worker leaves here, before the interpreter's shutdown
    raise SystemExit(code)
