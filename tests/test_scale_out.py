"""Scale-out in CI: `mllm train sft|grounding|preference` under DeepSpeed ZeRO-2 and ZeRO-3 (the shipped configs) in two
CPU processes over gloo, checked against one process on the same global batch, and a SIGKILLed run resumed with
`--resume-from-checkpoint auto`; FSDP, which accelerate runs on accelerators only, is refused on the CPU.

Each engine run is `torchrun --nproc_per_node 2 -m mllm train ... --per-device-train-batch-size 2 --deepspeed
configs/ds_zero{2,3}.json` (the README's line); the reference is one process with batch 4, the same four steps, seed
and data. Tolerances (docs/LOG.md, 2026-12-04): the whole model's weight update may differ from the reference's by
1e-3 of its norm (measured 2e-5 to 1.4e-4) and no single weight by more than half of one Adam step (lr / 2;
measured up to 0.2 lr). The processes sum the batch in another order (and ZeRO-3 runs its matrix products on gathered
copies of the weights), and Adam's normalised step turns that float noise into differences of a good part of a step
in the few weights whose gradient is almost zero (the key biases, whose gradient is zero in exact arithmetic, most).
ZeRO-2 gives DDP's weights bit for bit. A resumed run must end within 1e-6 of the uninterrupted one (measured: equal).

Dropout is off in these runs: its masks depend on how samples are spread over processes, so no layout can match
another's. The first DeepSpeed launch on a fresh machine compiles DeepSpeed's shared-memory communication op (about a
minute on two cores, cached under ~/.cache/torch_extensions).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers.training import distributed_env, kill_tree, torchrun

from mllm.cli import main

ROOT = Path(__file__).resolve().parents[1]
ENGINES = {
    "zero2": ["--deepspeed", str(ROOT / "configs" / "ds_zero2.json")],
    "zero3": ["--deepspeed", str(ROOT / "configs" / "ds_zero3.json")],
}
COMMANDS = ("sft", "grounding", "preference")
STEPS, SAVE_STEPS, GLOBAL_BATCH, PROCESSES = 4, 2, 4, 2
LEARNING_RATES = {"sft": 1e-3, "grounding": 1e-3, "preference": 1e-4}
"""Constant learning rates (preference training of the random model with summed log-probs jumps around even at
1e-5, and at 1e-3 with averaged ones: a chaotic run magnifies any float difference)."""
UPDATE_TOLERANCE = 1e-3
"""Largest ||engine - reference|| / ||reference - initial|| over all weights together."""
STEP_SHARE_TOLERANCE = 0.5
"""Largest difference of one weight to the reference, in Adam steps (learning rates)."""
RESUME_TOLERANCE = 1e-6
"""Largest difference of one weight between a resumed and an uninterrupted run of the same engine."""
LOGP_TOLERANCE = 1e-4
"""Largest difference of a reference log-prob (summed over a response) to the one-process file's."""
TIMEOUT = 600


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, small_model_dir: Path) -> dict[str, Path]:
    """A small toy world (every file format) and its REC records prepared as grounding conversations."""
    from mllm.toy.world import make_toy_world

    root = tmp_path_factory.mktemp("scale_out_world")
    make_toy_world(root / "world", n_train=12, n_test=4, n_preference=8)
    world = root / "world"
    grounding = root / "grounding_train.json"
    argv = [
        "prepare-grounding",
        "--rec",
        str(world / "grounding" / "rec_train.jsonl"),
        "--rec-templates",
        str(world / "grounding" / "templates_rec.json"),
        "--image-root",
        str(world),
        "--out",
        str(grounding),
    ]
    assert main(argv) == 0
    return {"model": small_model_dir, "images": world, "grounding": grounding, "root": root}


def command_argv(command: str, world: dict[str, Path], out: Path, batch: int) -> list[str]:
    """`train COMMAND ...` with the shared settings: constant learning rate, no weight decay, every step logged."""
    data = {
        "sft": world["images"] / "sft" / "train.json",
        "grounding": world["grounding"],
        "preference": world["images"] / "preference" / "preference_train.json",
    }[command]
    argv = ["train", command, "--model", str(world["model"]), "--data", str(data)]
    argv += ["--image-folder", str(world["images"]), "--output-dir", str(out)]
    argv += [
        "--max-steps",
        str(STEPS),
        "--save-steps",
        str(SAVE_STEPS),
        "--per-device-train-batch-size",
        str(batch),
    ]
    argv += ["--learning-rate", str(LEARNING_RATES[command]), "--lr-scheduler-type", "constant"]
    argv += ["--weight-decay", "0"]
    argv += ["--logging-steps", "1", "--report-to", "none", "--seed", "0"]
    if (
        command == "grounding"
    ):  # LoRA: adapters on the LLM, the resampler trained in full and saved beside them
        argv += ["--use-lora", "true", "--lora-r", "8", "--lora-alpha", "16", "--lora-dropout", "0"]
    if (
        command == "preference"
    ):  # full fine-tune; reference log-probs computed by the run itself, each rank its share
        argv += ["--beta", "0.5", "--use-average-logp", "true", "--logp-batch-size", "2"]
    return argv


class Runs:
    """Training runs made once per module and shared by the tests that compare them."""

    def __init__(self, world: dict[str, Path]):
        self.world = world
        self.done: dict[tuple[str, str], Path] = {}

    def reference(self, command: str) -> Path:
        """One process, the whole global batch per step, in this process."""
        key = ("single", command)
        if key not in self.done:
            out = self.world["root"] / f"single_{command}"
            assert main(command_argv(command, self.world, out, GLOBAL_BATCH)) == 0
            self.done[key] = out
        return self.done[key]

    def engine(self, engine: str, command: str) -> Path:
        """Two processes of half the batch each under `engine`, uninterrupted."""
        key = (engine, command)
        if key not in self.done:
            out = self.world["root"] / f"{engine}_{command}"
            launch(self.argv(engine, command, out))
            self.done[key] = out
        return self.done[key]

    def argv(self, engine: str, command: str, out: Path) -> list[str]:
        batch = GLOBAL_BATCH // PROCESSES
        return torchrun(
            PROCESSES, "-m", "mllm", *command_argv(command, self.world, out, batch), *ENGINES[engine]
        )


@pytest.fixture(scope="module")
def runs(world: dict[str, Path]) -> Runs:
    return Runs(world)


def launch(argv: list[str]) -> None:
    result = subprocess.run(argv, env=distributed_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr[-6000:]


def trained_weights(out: Path, base: Path) -> dict[str, torch.Tensor]:
    """The saved model loaded strictly; a LoRA run is merged into its base first (`mllm merge-lora`), so the
    adapter and the modules saved beside it must all be there and be the trained ones."""
    from mllm.model.modeling import MLLMModel
    from mllm.train.lora import merge_lora

    if (out / "adapter_config.json").is_file():
        out = merge_lora(base, out, out.parent / f"{out.name}_merged", overwrite=True)
    return MLLMModel.from_pretrained(out).state_dict()


def differences(
    got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], initial: dict[str, torch.Tensor]
) -> tuple[float, float, float]:
    """(largest weight difference, ||got - want|| / ||want - initial||, largest change of training itself)."""
    assert got.keys() == want.keys()
    largest = max((got[k] - want[k]).abs().max().item() for k in want)
    diff = sum(((got[k] - want[k]).double() ** 2).sum() for k in want) ** 0.5
    update = sum(((want[k] - initial[k]).double() ** 2).sum() for k in want) ** 0.5
    change = max((want[k] - initial[k]).abs().max().item() for k in want)
    return largest, float(diff / update), change


def losses(out: Path) -> list[float]:
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return [row["loss"] for row in history if "loss" in row]


def reference_logps(out: Path) -> dict[int, tuple[float, float]]:
    lines = (out / "reference_logps.jsonl").read_text().splitlines()[1:]
    records = [json.loads(line) for line in lines]
    return {r["idx"]: (r["chosen_logp"], r["rejected_logp"]) for r in records}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_two_processes_match_one_on_the_same_global_batch(
    runs: Runs, world: dict[str, Path], engine: str, command: str
) -> None:
    from mllm.model.modeling import MLLMModel

    reference = runs.reference(command)
    out = runs.engine(engine, command)
    initial = MLLMModel.from_pretrained(world["model"]).state_dict()
    want = trained_weights(reference, world["model"])
    largest, relative, change = differences(trained_weights(out, world["model"]), want, initial)
    lr = LEARNING_RATES[command]
    print(
        f"{engine} {command}: max |w - w_single| {largest:.2e} = {largest / lr:.2f} lr, relative {relative:.2e}"
    )
    assert change > 2 * lr  # training moved the weights: the comparison means something
    assert relative <= UPDATE_TOLERANCE and largest <= STEP_SHARE_TOLERANCE * lr
    assert losses(out) == pytest.approx(losses(reference), rel=1e-4)
    assert len(losses(out)) == STEPS
    if command == "preference":
        got, expected = reference_logps(out), reference_logps(reference)
        assert got.keys() == expected.keys()
        worst = max(abs(a - b) for k in expected for a, b in zip(got[k], expected[k]))
        print(f"{engine} reference log-probs: max difference {worst:.1e}")
        assert worst <= LOGP_TOLERANCE


RESUMED = {"zero2": "sft", "zero3": "grounding"}
"""Which command each engine's kill-and-resume test runs (ZeRO-3 with LoRA: only the adapter and the resampler are in
its checkpoints)."""


@pytest.mark.parametrize("engine", sorted(RESUMED))
def test_killed_run_resumes_to_the_uninterrupted_weights(
    runs: Runs, world: dict[str, Path], engine: str
) -> None:
    command = RESUMED[engine]
    out = world["root"] / f"{engine}_{command}_killed"
    argv = runs.argv(engine, command, out)
    first = out / f"checkpoint-{SAVE_STEPS}"
    process = subprocess.Popen(argv, env=distributed_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + TIMEOUT
        # complete: Trainer writes trainer_state.json last on rank 0; each rank writes its own RNG state
        while not all(
            (first / name).is_file() for name in ("trainer_state.json", "rng_state_0.pth", "rng_state_1.pth")
        ):
            assert process.poll() is None, process.stderr.read()[-6000:]
            assert time.monotonic() < deadline, "no checkpoint in time"
            time.sleep(0.02)
        kill_tree(process.pid)
    finally:
        process.wait(timeout=60)
        process.stderr.close()
    assert not (out / "trainer_state.json").exists(), "the run finished before it was killed"
    launch([*argv, "--resume-from-checkpoint", "auto"])
    uninterrupted = runs.engine(engine, command)
    assert losses(out)[-1] == pytest.approx(losses(uninterrupted)[-1], rel=1e-6)
    got = trained_weights(out, world["model"])
    want = trained_weights(uninterrupted, world["model"])
    largest = max((got[k] - want[k]).abs().max().item() for k in want)
    print(
        f"{engine} {command} killed after step {SAVE_STEPS} and resumed: max |w - w_uninterrupted| {largest:.1e}"
    )
    assert largest <= RESUME_TOLERANCE


def test_save_pretrained_is_transformers_with_the_official_layout(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    """What Trainer passes after gathering shards is what gets written; the key layout is the official checkpoint's."""
    from safetensors.torch import load_file

    from mllm.model.modeling import MLLMModel

    model = MLLMModel.from_pretrained(tiny_model_dir)
    model.save_pretrained(tmp_path / "plain")
    assert (
        load_file(tmp_path / "plain" / "model.safetensors").keys()
        == load_file(tiny_model_dir / "model.safetensors").keys()
    )
    gathered = {k: torch.full_like(v, 0.5) for k, v in model.state_dict().items()}  # as if from ZeRO-3 shards
    model.save_pretrained(tmp_path / "gathered", state_dict=gathered)
    assert all(
        (v == 0.5).all() for v in MLLMModel.from_pretrained(tmp_path / "gathered").state_dict().values()
    )
    model.save_pretrained(tmp_path / "other_rank", is_main_process=False)
    assert not any((tmp_path / "other_rank").glob("*.safetensors"))
    with pytest.raises(ValueError, match="safetensors only"):
        model.save_pretrained(tmp_path / "bin", safe_serialization=False)


def test_fsdp_on_cpu_is_refused_naming_the_flag(tmp_path: Path, small_model_dir: Path, capsys) -> None:
    """accelerate only switches to FSDP for accelerator processes; on CPUs it would train without sharding."""
    from helpers.data_files import make_sft_files

    data = make_sft_files(tmp_path / "d", 4)
    argv = [
        "train",
        "sft",
        "--model",
        str(small_model_dir),
        "--data",
        str(data),
        "--output-dir",
        str(tmp_path / "o"),
    ]
    assert main([*argv, "--fsdp", "--max-steps", "1"]) == 2
    assert (
        "--fsdp needs GPUs (or other accelerators) in processes started by torchrun"
        in capsys.readouterr().err
    )
    assert not (tmp_path / "o" / "model.safetensors").exists()


def test_two_nodes_by_rendezvous_train_as_two_local_processes(runs: Runs, world: dict[str, Path]) -> None:
    """The README's several-node recipe on one machine: two torchrun launchers of one process each, meeting at a c10d
    rendezvous endpoint as two nodes would, train exactly what one launcher of two processes trains."""
    from mllm.train.launch import free_port

    out = world["root"] / "two_nodes_zero2_sft"
    batch = GLOBAL_BATCH // PROCESSES
    rendezvous = [
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"127.0.0.1:{free_port()}",
        "--rdzv-id",
        "two-nodes",
    ]
    node = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "2",
        "--nproc-per-node",
        "1",
        *rendezvous,
    ]
    argv = [*node, "-m", "mllm", *command_argv("sft", world, out, batch), *ENGINES["zero2"]]
    nodes = [
        subprocess.Popen(argv, env=distributed_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for _ in range(2)
    ]
    errors = [process.communicate(timeout=TIMEOUT)[1].decode(errors="replace") for process in nodes]
    assert [process.returncode for process in nodes] == [0, 0], "\n".join(e[-3000:] for e in errors)
    got = trained_weights(out, world["model"])
    want = trained_weights(runs.engine("zero2", "sft"), world["model"])
    largest = max((got[k] - want[k]).abs().max().item() for k in want)
    print(f"two nodes of one process against one node of two (ZeRO-2 sft): max |w difference| {largest:.1e}")
    assert largest <= RESUME_TOLERANCE
