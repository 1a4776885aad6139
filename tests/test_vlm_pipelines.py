"""The data pipelines on a tiny directory of each transformers family (tests/helpers/vlm_tiny.py): `mllm eval vqa`,
`mllm logp`, the freeze flags, `mllm train sft` / `preference` and `mllm merge-lora`, through the same commands and
the same Trainer path as for MiniCPM-V, with the family's part behind `mllm.vlm`.

Every family runs eval vqa, logp and the freeze-flag mapping (their only family-specific code is `vlm.prepare` and
`parameter_groups`). Training runs a representative subset: the Trainer, the collator and the loss are one code path
whatever the family, so SFT runs LLaVA (full fine-tune, CLIP + Llama), Qwen2-VL (LoRA + merge-lora, the merger inside
the vision tower) and BLIP-2 (full, OPT behind a Q-Former); preference training runs LLaVA and Qwen2-VL."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers.data_files import QUESTION, make_preference_file, make_sft_files
from helpers.vlm_tiny import FAMILIES, build_tiny
from PIL import Image

from mllm.api import load_vlm
from mllm.cli import main
from mllm.data.conversations import ConversationPairs
from mllm.data.preference import open_image
from mllm.model.chat import decoding_kwargs
from mllm.train.logps import load_reference_logps, read_records

TRAIN_FLAGS = ["--report-to", "none", "--logging-steps", "1", "--save-strategy", "no", "--seed", "0"]


@pytest.fixture(scope="module", params=FAMILIES)
def family_dir(request, tmp_path_factory) -> Path:
    return build_tiny(request.param, tmp_path_factory.mktemp(request.param.replace("-", "_")))


@pytest.fixture(scope="module")
def family_vlm(family_dir):
    return load_vlm(family_dir, device="cpu")


def _tiny(family: str, tmp_path: Path) -> Path:
    return build_tiny(family, tmp_path / family.replace("-", "_"))


def test_eval_vqa_answers_through_the_family(family_dir, family_vlm, tmp_path, capsys) -> None:
    data = make_sft_files(tmp_path / "data", n=3)
    out = tmp_path / "preds.jsonl"
    argv = ["eval", "vqa", str(family_dir), "--data", str(data), "--out", str(out), "--device", "cpu"]
    assert main([*argv, "--max-new-tokens", "3", "--batch-size", "2"]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["idx"] for r in records] == [0, 1, 2]
    items = json.loads(data.read_text())
    for record, item in zip(records, items, strict=True):
        image = Image.open(data.parent / item["image"]).convert("RGB")
        question = item["conversations"][0]["content"].removeprefix("<image>\n")
        conversation = [{"role": "user", "content": [image, question]}]
        expected = family_vlm.answer([conversation], **decoding_kwargs("greedy", max_new_tokens=3))[0]
        assert record["prediction"] == expected
    report = json.loads((tmp_path / "preds.accuracy.json").read_text())
    assert report["overall"]["total"] == 3
    capsys.readouterr()
    assert main([*argv, "--max-new-tokens", "4"]) == 2  # the fingerprint holds the decoding settings
    assert "made with other inputs or settings" in capsys.readouterr().err


def _pair_conversations(data: Path, item: dict) -> dict[str, list]:
    source = item.get("image") or str(data.parent / item["image_path"])
    source = Path(source) if "image_path" in item else source
    with open_image(source, "test") as image:
        rgb = image.convert("RGB")
    return {
        name: [{"role": "user", "content": [rgb, QUESTION]}, {"role": "assistant", "content": item[name]}]
        for name in ("chosen", "rejected")
    }


def test_logp_equals_a_direct_computation(family_dir, family_vlm, tmp_path, capsys) -> None:
    data = make_preference_file(tmp_path / "pref", n=3, base64_every=2)
    out = tmp_path / "ref.jsonl"
    argv = ["logp", str(family_dir), "--data", str(data), "--out", str(out), "--device", "cpu"]
    assert main([*argv, "--batch-size", "2"]) == 0
    header, records = read_records(out)
    assert header["format"] == "mllm-reference-logps-v1" and header["n_items"] == 3
    assert header["max_slice_nums"] is None and header["model"]["weights"]  # the model's fingerprint, as ours
    assert header["tokenizer"]
    items = json.loads(data.read_text())
    for record, item in zip(records, items, strict=True):
        assert record["idx"] == item["idx"]
        for name, conversation in _pair_conversations(data, item).items():
            batch = family_vlm.prepare([conversation], with_labels=True)
            with torch.no_grad():
                per_token, total, average = family_vlm.response_logps(batch)
            mask = batch.labels[0, 1:] != -100
            assert record[f"{name}_tokens"] == int(mask.sum()) > 0
            assert record[f"{name}_logp"] == pytest.approx(float(total[0]), rel=1e-4, abs=1e-4)
            assert record[f"{name}_avg_logp"] == pytest.approx(float(average[0]), rel=1e-4, abs=1e-4)
            assert record[f"{name}_per_token_logp"] == pytest.approx(per_token[0][mask].tolist(), abs=1e-4)
    pairs = ConversationPairs(data, family_vlm)
    load_reference_logps(out, pairs, family_dir)  # the same file format, read back for training
    batch = pairs.collator()([pairs[0], pairs[1]])
    assert batch["ref_chosen_logps"].tolist() == pytest.approx(
        [records[0]["chosen_logp"], records[1]["chosen_logp"]]
    )
    pairs.pairs[0].reference.chosen_tokens += 1  # a file made for other tokens is refused, naming the pair
    with pytest.raises(ValueError, match="idx 0: the reference log-probs cover"):
        pairs.collator()([pairs[0]])
    before = out.read_bytes()
    assert main(argv) == 0 and out.read_bytes() == before  # a rerun finds the work done and keeps the file
