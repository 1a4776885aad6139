"""`mllm answer` at scale: length bucketing, data-parallel part files merged with every idx exactly once, resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from mllm.eval.answer import (
    QuestionItem,
    bucketed,
    generate_answers,
    prefetched,
)
from mllm.io import ResumableJsonl

ROOT = Path(__file__).resolve().parents[1]
N_ITEMS = 23


def write_questions(path: Path, count: int = N_ITEMS) -> Path:
    """Text-only questions of varied length (idx i has i % 7 + 1 words), one malformed line at idx 5."""
    lines = [json.dumps({"question": " ".join(["word"] * (i % 7 + 1)), "image_id": i}) for i in range(count)]
    lines[5] = "{not json"
    path.write_text("\n".join(lines) + "\n")
    return path


def part_files(out: Path) -> list[Path]:
    return ResumableJsonl(out, {}).part_files()


def fake_answer(batch: list[QuestionItem]) -> tuple[list[str], int]:
    return [f"answer {item.idx}" for item in batch], len(batch)


def question_length(item: QuestionItem) -> int:
    return len(item.question)


def answered(out: Path) -> list[int]:
    return [json.loads(line)["idx"] for line in out.read_text().splitlines()]


def expected_idx(count: int = N_ITEMS) -> list[int]:
    return [i for i in range(count) if i != 5]


def test_bucketed_batches_sort_by_length_within_windows():
    items = [QuestionItem(i, "x" * (i % 5 + 1), None, i) for i in range(12)]
    batches = list(bucketed(iter(items), 3, question_length, window=6))
    assert [len(b) for b in batches] == [3, 3, 3, 3]
    first_window = [item.idx for b in batches[:2] for item in b]
    assert sorted(first_window) == list(range(6))  # a window never mixes with the next
    lengths = [len(item.question) for b in batches[:2] for item in b]
    assert lengths == sorted(lengths, reverse=True)


def test_length_bucketing_writes_every_idx_once(tmp_path):
    questions = write_questions(tmp_path / "q.jsonl")
    seen: list[list[int]] = []

    def answer(batch):
        seen.append([len(item.question) for item in batch])
        return fake_answer(batch)

    out = tmp_path / "a.jsonl"
    summary = generate_answers(questions, out, answer, "m", batch_size=4, length_fn=question_length)
    assert sorted(answered(out)) == expected_idx()
    assert summary.succeeded == N_ITEMS - 1 and summary.failed == 1
    flat = [n for batch in seen for n in batch]
    assert flat == sorted(flat, reverse=True)  # one window: longest prompts first, so batches pad little
    record = json.loads(out.read_text().splitlines()[0])
    assert record["answer"] == f"answer {record['idx']}" and record["image_id"] == record["idx"]


def _rank_main(rank: int, world_size: int, questions: str, out: str, store: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        generate_answers(
            questions,
            out,
            fake_answer,
            "m",
            batch_size=3,
            length_fn=question_length,
            shard=(rank, world_size),
            barrier=dist.barrier,
        )
    finally:
        dist.destroy_process_group()


def run_two_ranks(questions: Path, out: Path, store: Path) -> None:
    mp.start_processes(
        _rank_main, args=(2, str(questions), str(out), str(store)), nprocs=2, join=True, start_method="spawn"
    )


def test_two_gloo_ranks_merge_every_idx_exactly_once(tmp_path):
    questions = write_questions(tmp_path / "q.jsonl")
    out = tmp_path / "a.jsonl"
    run_two_ranks(questions, out, tmp_path / "store")
    assert sorted(answered(out)) == expected_idx()
    assert part_files(out) == []


def crash_after(batches: int):
    """An answer function that dies on its (batches + 1)-th batch, like a killed rank."""
    calls = []

    def answer(batch):
        calls.append(1)
        if len(calls) > batches:
            raise RuntimeError("killed")
        return fake_answer(batch)

    return answer


def partial_run(questions: Path, out: Path) -> None:
    """Rank 0 of a 2-rank run finished its share (no merge), rank 1 died after one batch leaving a torn line;
    the output already holds four answers from an earlier single-process run (two of them also in part 0)."""

    def old_answer(batch):
        return [f"old {item.idx}" for item in batch], len(batch)

    generate_answers(questions, out, old_answer, "m", batch_size=2, limit=4)
    generate_answers(questions, out, fake_answer, "m", batch_size=3, shard=(0, 2))
    with pytest.raises(RuntimeError, match="killed"):
        generate_answers(questions, out, crash_after(1), "m", batch_size=3, shard=(1, 2))
    with part_files(out)[1].open("a") as handle:
        handle.write('{"idx": 21, "answ')  # torn by the kill


def test_resume_after_a_partial_parallel_run_with_two_ranks(tmp_path):
    questions = write_questions(tmp_path / "q.jsonl")
    out = tmp_path / "a.jsonl"
    partial_run(questions, out)
    assert len(part_files(out)) == 2
    run_two_ranks(questions, out, tmp_path / "store")
    idx = answered(out)
    assert sorted(idx) == expected_idx() and len(idx) == len(set(idx))
    assert part_files(out) == []
    first = json.loads(out.read_text().splitlines()[0])
    assert first["answer"] == "old 0"  # answered items are never redone


def test_single_process_rerun_merges_left_over_parts(tmp_path):
    questions = write_questions(tmp_path / "q.jsonl")
    out = tmp_path / "a.jsonl"
    partial_run(questions, out)
    summary = generate_answers(questions, out, fake_answer, "m", batch_size=5)
    idx = answered(out)
    assert sorted(idx) == expected_idx() and len(idx) == len(set(idx))
    assert part_files(out) == []
    assert summary.succeeded > 0  # rank 1's unfinished share was answered now


def test_bad_shard_is_rejected(tmp_path):
    questions = write_questions(tmp_path / "q.jsonl")
    with pytest.raises(ValueError, match="rank"):
        generate_answers(questions, tmp_path / "a.jsonl", fake_answer, "m", shard=(2, 2))


def test_cli_under_torchrun_with_fast_generate(small_model_dir, tiny_model_dir, tmp_path):
    """The real path: torchrun, 2 CPU ranks, the fixture model, --fast-generate, bucketing, the merge."""
    images = tiny_model_dir / "images"
    questions = tmp_path / "q.jsonl"
    rows = [
        {"image": str(images / name), "question": question, "image_id": i}
        for i, (name, question) in enumerate(
            [
                ("img_448x448.png", "What is this?"),
                ("img_90x60.png", "Describe the image in detail, please."),
                ("img_1000x300.png", "Colour?"),
            ]
        )
    ]
    questions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "answers.jsonl"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "mllm",
        "answer",
        str(small_model_dir),
        "--questions",
        str(questions),
        "--out",
        str(out),
        "--batch-size",
        "2",
        "--strategy",
        "beam",
        "--max-new-tokens",
        "3",
        "--fast-generate",
        "--device",
        "cpu",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["idx"] for r in records) == [0, 1, 2]
    assert all(isinstance(r["answer"], str) for r in records)
    assert part_files(out) == []


def test_prefetched_pairs_each_batch_with_its_prepared_inputs(tmp_path):
    batches = [[QuestionItem(i, "q", None, i)] for i in range(4)]
    pairs = list(prefetched(iter(batches), lambda batch: [item.idx * 10 for item in batch]))
    assert [(b[0].idx, inputs) for b, inputs in pairs] == [(0, [0]), (1, [10]), (2, [20]), (3, [30])]
    assert list(prefetched(iter([]), lambda batch: 1)) == []
    questions = write_questions(tmp_path / "q.jsonl")
    calls = []

    def answer(batch, inputs=None):
        calls.append(inputs)
        return fake_answer(batch)

    answer.prepare = lambda batch: len(batch)
    generate_answers(questions, tmp_path / "a.jsonl", answer, "m", batch_size=10)
    assert calls == [10, 10, 2]  # generate_answers hands every batch its prepared inputs
