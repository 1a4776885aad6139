"""`python -m mllm ...` (also what `torchrun -m mllm ...` runs)."""

from mllm.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
