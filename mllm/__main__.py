"""`python -m mllm ...` (also what `torchrun -m mllm ...` runs)."""

from mllm.cli import run_command

if __name__ == "__main__":
    raise SystemExit(run_command())
