"""One spelling across the command line (MODEL first, --out, --image-root, `mllm eval chair|vqa|grounding|decoding`)
and the older spellings kept as hidden aliases: both parse to the same settings, only the new ones are listed."""

from __future__ import annotations

import pytest

from mllm.cli import build_parser, parse_args
from mllm.cli.train import training_argv

SAME = [
    (
        ["eval", "chair", "--answers", "a.jsonl", "--out", "c.json", "--nlp", "builtin"],
        ["chair", "--answers", "a.jsonl", "--save-path", "c.json", "--nlp", "builtin"],
    ),
    (
        ["eval", "vqa", "M", "--data", "t.json", "--image-root", "img", "--out", "p.jsonl"],
        ["eval-vqa", "M", "--data", "t.json", "--image-folder", "img", "--out", "p.jsonl"],
    ),
    (
        ["eval", "decoding", "M", "--questions", "q.jsonl", "--cache", "gt.json", "--out", "cmp"],
        ["compare-decoding", "M", "--questions", "q.jsonl", "--cache", "gt.json", "--out-dir", "cmp"],
    ),
    (
        ["eval", "grounding", "M", "--data", "val.jsonl", "--out", "g"],
        ["eval", "grounding", "M", "--data", "val.jsonl", "--out-dir", "g"],
    ),
    (
        ["score-grounding", "--predictions", "p.jsonl", "--out", "s"],
        ["score-grounding", "--predictions", "p.jsonl", "--out-dir", "s"],
    ),
    (
        ["logp", "M", "--data", "d.json", "--out", "r.jsonl", "--image-root", "img"],
        ["logp", "--model", "M", "--data", "d.json", "--out", "r.jsonl", "--image-folder", "img"],
    ),
    (
        ["prepare-grounding", "--out", "o.json", "--mix-sft", "s.json", "--mix-image-root", "img"],
        ["prepare-grounding", "--out", "o.json", "--mix-sft", "s.json", "--mix-image-folder", "img"],
    ),
]
IGNORED = ("command", "eval_task", "legacy_model")


def settings(argv: list[str]) -> dict:
    _, args = parse_args(argv)
    return {k: v for k, v in vars(args).items() if k not in IGNORED}


@pytest.mark.parametrize("new, old", SAME, ids=[" ".join(new[:2]) for new, _ in SAME])
def test_old_spellings_parse_as_the_new_ones(new, old):
    assert settings(new) == settings(old)


def test_only_the_new_spellings_are_listed():
    parser = build_parser()
    top = parser.format_help()
    assert "eval" in top and not any(old in top for old in ("eval-vqa", "compare-decoding", "\n    chair"))
    eval_help = parser._subparsers._group_actions[0].choices["eval"].format_help()
    assert all(task in eval_help for task in ("chair", "vqa", "grounding", "decoding"))
    vqa = parser._subparsers._group_actions[0].choices["eval-vqa"].format_help()
    assert "--image-root" in vqa and "--image-folder" not in vqa


def test_the_model_comes_once(capsys):
    assert parse_args(["logp", "M", "--model", "M", "--data", "d", "--out", "o"])[1].model == "M"
    with pytest.raises(SystemExit):
        parse_args(["logp", "M", "--model", "N", "--data", "d", "--out", "o"])
    with pytest.raises(SystemExit):
        parse_args(["logp", "--data", "d", "--out", "o"])
    assert "MODEL is required" in capsys.readouterr().err


def test_training_takes_the_same_spellings():
    argv = training_argv(["M", "--data", "d.json", "--out", "o", "--image-root=img", "--bf16", "true"])
    assert argv == [
        "--model",
        "M",
        "--data",
        "d.json",
        "--output-dir",
        "o",
        "--image-folder=img",
        "--bf16",
        "true",
    ]
    assert training_argv(["--model", "M", "--output-dir", "o"]) == ["--model", "M", "--output-dir", "o"]
