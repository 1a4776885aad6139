"""The data pipelines on a tiny directory of each transformers family (tests/helpers/vlm_tiny.py): `mllm eval vqa`,
`mllm logp`, the freeze flags, `mllm train sft` / `preference` and `mllm merge-lora`, through the same commands and
the same Trainer path as for MiniCPM-V, with the family's part behind `mllm.vlm`.

Every family runs eval vqa, logp and the freeze-flag mapping (their only family-specific code is `vlm.prepare` and
`parameter_groups`). Training runs a representative subset: the Trainer, the collator and the loss are one code path
whatever the family, so SFT runs LLaVA (full fine-tune, CLIP + Llama), Qwen2-VL (LoRA + merge-lora, the merger inside
the vision tower) and BLIP-2 (full, OPT behind a Q-Former); preference training runs LLaVA and Qwen2-VL."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import pytest
import torch
from helpers.data_files import QUESTION, make_preference_file, make_sft_files
from helpers.vlm_tiny import FAMILIES, build_tiny
from helpers.web import answers_in_one_batch
from PIL import Image

from mllm.api import load_vlm
from mllm.cli import main
from mllm.data.conversations import ConversationDataset, ConversationPairs, VLMCollator
from mllm.data.preference import open_image
from mllm.model.chat import decoding_kwargs
from mllm.model.losses import sft_loss
from mllm.train.logps import load_reference_logps, read_records
from mllm.train.runner import MLLMTrainingArguments
from mllm.train.sft import ModelArguments, load_for_training
from mllm.vlm import as_vlm

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


def _trainable_groups(model, vlm) -> set[str]:
    base = dict(vlm.model.named_parameters())
    groups = set()
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            plain = name.removeprefix("base_model.model.")
            plain = plain.replace(".modules_to_save.default.", ".").replace(".lora_A.default", "")
            plain = plain.replace(".lora_B.default", "")
            plain = plain if plain in base else plain.replace(".base_layer", "")
            groups.add(vlm.group_of(plain))
    return groups


def test_freeze_flags_map_to_the_familys_groups(family_dir, tmp_path) -> None:
    args = MLLMTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    only_projector = ModelArguments(
        model=str(family_dir), tune_vision=False, tune_llm=False, tune_resampler=True
    )
    model, processor = load_for_training(only_projector, args)
    vlm = as_vlm(model, processor)
    assert _trainable_groups(model, vlm) == {"projector"}
    vision_and_llm = ModelArguments(model=str(family_dir), tune_vision=True, tune_resampler=False)
    model, _ = load_for_training(vision_and_llm, args)
    assert _trainable_groups(model, vlm) == {"vision", "llm"}
    lora = ModelArguments(model=str(family_dir), use_lora=True, lora_r=4, tune_resampler=False)
    model, _ = load_for_training(lora, args)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert _trainable_groups(model, vlm) == {"llm"}


def _dataset_loss(model_dir: Path, data: Path) -> float:
    """The SFT loss of a model directory (or LoRA checkpoint) over every item of `data`, in one batch."""
    vlm = load_vlm(model_dir, device="cpu")
    dataset = ConversationDataset(data)
    batch = VLMCollator(vlm, 4096)([dataset[i] for i in range(len(dataset))])
    with torch.no_grad():
        logits = vlm.model(**batch["inputs"], use_cache=False).logits
    return float(sft_loss(logits, batch["labels"]))


def _grounding_data(root: Path) -> Path:
    """`prepare-grounding --box-format qwen2vl` on four REC records (a red square in each quarter of a 56x56 image)."""
    (root / "images").mkdir(parents=True)
    records = []
    for i, (x0, y0) in enumerate([(4, 4), (28, 4), (4, 28), (28, 28)]):
        image = Image.new("RGB", (56, 56), "white")
        image.paste((220, 30, 30), (x0, y0, x0 + 24, y0 + 24))
        image.save(root / "images" / f"{i}.png")
        records.append(
            {"img_path": f"{i}.png", "expression": "the red square", "bbox": [x0, y0, x0 + 24, y0 + 24]}
        )
    (root / "rec.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    out = root / "train.json"
    argv = ["prepare-grounding", "--rec", str(root / "rec.jsonl"), "--image-root", str(root / "images")]
    assert main([*argv, "--out", str(out), "--box-format", "qwen2vl"]) == 0
    assert "<|box_start|>" in json.loads(out.read_text())[0]["conversations"][1]["content"]
    return out


@pytest.mark.parametrize(
    ("family", "task", "lora"),
    [("llava", "sft", False), ("qwen2_vl", "grounding", True), ("blip-2", "sft", False)],
)
def test_sft_through_the_cli_lowers_the_loss(family, task, lora, tmp_path, capsys) -> None:
    """SFT (full, the vision tower tuned too) and grounding (LoRA, on data in Qwen2-VL's own box syntax)."""
    model_dir = _tiny(family, tmp_path)
    data = (
        _grounding_data(tmp_path / "data") if task == "grounding" else make_sft_files(tmp_path / "data", n=4)
    )
    out = tmp_path / "sft"
    argv = ["train", task, str(model_dir), "--data", str(data), "--out", str(out), *TRAIN_FLAGS]
    argv += ["--max-steps", "6", "--per-device-train-batch-size", "4", "--learning-rate", "2e-3"]
    argv += ["--use-lora", "true", "--lora-r", "8"] if lora else ["--tune-vision", "true"]
    assert main(argv) == 0
    before, after = _dataset_loss(model_dir, data), _dataset_loss(out, data)
    assert after < before - 0.5, (before, after)
    if lora:
        image = Image.open(json.loads(data.read_text())[0]["image"]).convert("RGB")
        _check_merge_lora(model_dir, out, tmp_path, image, capsys)


def _check_merge_lora(model_dir: Path, checkpoint: Path, tmp_path: Path, image: Image.Image, capsys) -> None:
    """merge-lora writes a plain model whose logits are those of the base with the adapter on (peft, unmerged)."""
    from peft import PeftModel

    merged = tmp_path / "merged"
    assert main(["merge-lora", str(model_dir), str(checkpoint), str(merged)]) == 0
    assert not (merged / "adapter_config.json").exists()
    base = load_vlm(model_dir, device="cpu")
    adapter = PeftModel.from_pretrained(base.model, str(checkpoint)).eval()
    batch = base.prepare(
        [[{"role": "user", "content": [image, "Is it red?"]}, {"role": "assistant", "content": "Yes"}]],
        with_labels=True,
    )
    with torch.no_grad():
        expected = adapter(**batch.inputs, use_cache=False).logits
        got = load_vlm(merged, device="cpu").logits(batch)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert (
        main(["merge-lora", str(model_dir), str(checkpoint), str(merged)]) == 2
    )  # never overwritten silently
    assert "not empty" in capsys.readouterr().err


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_preference_through_the_cli_lowers_the_loss(family, tmp_path) -> None:
    model_dir = _tiny(family, tmp_path)
    data = make_preference_file(tmp_path / "pref", n=4)
    out = tmp_path / "dpo"
    argv = ["train", "preference", str(model_dir), "--data", str(data), "--out", str(out), *TRAIN_FLAGS]
    argv += ["--max-steps", "6", "--per-device-train-batch-size", "4", "--learning-rate", "2e-3"]
    argv += ["--loss-type", "dpo", "--logp-batch-size", "2"]
    assert main(argv) == 0
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    losses = [row["loss"] for row in history if "loss" in row]
    assert losses[0] == pytest.approx(0.6931, abs=1e-3)  # the policy starts as the reference: -log sigmoid(0)
    assert losses[-1] < losses[0] - 0.1, losses
    header, _ = read_records(out / "reference_logps.jsonl")
    assert header["n_items"] == 4


def test_ground_reads_the_familys_own_box_syntax_by_default(tmp_path, capsys, monkeypatch) -> None:
    """Qwen2.5-VL writes absolute pixels, which `auto` would read as the 0..1000 grid: auto means the family's own."""
    from mllm.boxes import parse_box, to_pixels
    from mllm.vlm.hf import HFVLM

    model_dir = _tiny("qwen2_5_vl", tmp_path)
    answer = "<|object_ref_start|>it<|object_ref_end|><|box_start|>(10,12),(30,40)<|box_end|>"
    monkeypatch.setattr(HFVLM, "decode", lambda self, tokens: [answer] * len(tokens))
    path = tmp_path / "scene.png"
    Image.new("RGB", (112, 84), (255, 255, 255)).save(path)
    argv = ["ground", str(model_dir), "it", "--image", str(path), "--out", str(tmp_path / "found.png")]
    assert main([*argv, "--max-new-tokens", "2", "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    def pixels(box_format: str) -> list[float]:
        return [round(v, 1) for v in to_pixels(parse_box(answer, box_format, (112, 84)), 112, 84)]

    assert result["box_pixels"] == pixels("qwen25vl") == [10.0, 12.0, 30.0, 40.0] != pixels("auto")


def _request(colour: tuple[int, int, int] | None, question: str = QUESTION) -> list[dict]:
    """OpenAI chat messages: one user turn with a 40x36 image of `colour` (none for None) and `question`."""
    content: list[dict] = [{"type": "text", "text": question}]
    if colour is not None:
        buffer = io.BytesIO()
        Image.new("RGB", (40, 36), colour).save(buffer, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
        content.insert(0, {"type": "image_url", "image_url": {"url": url}})
    return [{"role": "user", "content": content}]


def _conversation(colour: tuple[int, int, int] | None, question: str = QUESTION) -> list[dict]:
    content = [question] if colour is None else [Image.new("RGB", (40, 36), colour), question]
    return [{"role": "user", "content": content}]


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_serve_answers_a_familys_requests_as_the_interface_alone_and_batched(family, tmp_path) -> None:
    """The server's path for every family is `vlm.prepare` + `vlm.generate_tokens` (two families: a Llama
    tokenizer with a bos, a Qwen one without): plain and streamed answers over HTTP, then four requests of different
    lengths, with and without an image, decoded in one batch, each as the interface answers it alone."""
    import openai

    from mllm.serve.app import Server, build_app
    from mllm.serve.batcher import BatchEngine
    from mllm.serve.config import ServeConfig

    model_dir = _tiny(family, tmp_path)
    vlm = load_vlm(model_dir, device="cpu")
    greedy = decoding_kwargs("greedy", max_new_tokens=6)
    app = build_app(vlm.model, vlm.processor, ServeConfig(model_name="tiny", port=0))
    server = Server(app, "127.0.0.1", 0).start()
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=120)
    try:
        reply = client.chat.completions.create(
            model="tiny", messages=_request((200, 10, 10)), temperature=0, max_tokens=6
        )
        chunks = client.chat.completions.create(
            model="tiny", messages=_request((200, 10, 10)), temperature=0, max_tokens=6, stream=True
        )
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finally:
        server.close()
    expected = vlm.answer([_conversation((200, 10, 10))], **greedy)[0]
    assert expected and reply.choices[0].message.content == streamed == expected
    prompt_tokens = vlm.prepare([_conversation((200, 10, 10))]).inputs["input_ids"].shape[1]
    assert reply.usage.prompt_tokens == prompt_tokens

    service = app.state.service
    asks = [
        ((10, 200, 10), QUESTION),
        (None, "Is there a dog?"),
        ((10, 10, 200), "Describe the picture."),
        (None, "Yes"),
    ]
    engine = BatchEngine(vlm.model, vlm.processor, max_batch_size=4, max_queue=8, batch_wait_ms=0)
    jobs = []
    for colour, question in asks:
        body = json.dumps({"messages": _request(colour, question), "temperature": 0, "max_tokens": 6})
        prepared = service.prepare(body.encode())
        jobs.append((prepared.encoded, prepared.request.decoding(8), 6))
    results = answers_in_one_batch(engine, jobs)
    assert engine.batch_sizes == [4]
    assert results == [vlm.answer([_conversation(c, q)], **greedy)[0] for c, q in asks]


def test_web_page_answers_with_the_family_and_draws_its_boxes(tmp_path, monkeypatch) -> None:
    """The page's answer step (`respond`, what the Send button runs) on a Qwen2.5-VL directory: the greedy answer
    streams and ends as the interface's, beam search answers in one piece; in grounding mode a box in the family's own syntax (pixels) is drawn where it is."""
    from mllm.vlm.hf import HFVLM
    from mllm.web.app import model_handle, respond
    from mllm.web.session import ChatSession, Decoding

    vlm = load_vlm(_tiny("qwen2_5_vl", tmp_path), device="cpu")
    handle = model_handle(vlm.model, vlm.processor)
    assert handle.box_format == "qwen25vl" and handle.max_length == 512
    path = tmp_path / "white.png"
    Image.new("RGB", (112, 84), "white").save(path)
    decoding = Decoding(max_new_tokens=5)
    steps = list(respond(handle, ChatSession(), [str(path)], QUESTION, decoding, False))
    shown, status, picture, _ = steps[-1]
    conversation = [{"role": "user", "content": [Image.open(path).convert("RGB"), QUESTION]}]
    expected = vlm.answer([conversation], **decoding.kwargs())[0]
    assert expected and shown[-1]["content"][0]["text"] == expected and status == "Done."
    growing = [step[0][-1]["content"][0]["text"] for step in steps[:-1] if step[0][-1]["role"] == "assistant"]
    assert len(set(growing)) > 2 and all(expected.startswith(text) for text in growing)  # streamed
    beam = Decoding(strategy="beam", num_beams=2, max_new_tokens=5)
    shown, *_ = list(respond(handle, ChatSession(), [str(path)], QUESTION, beam, False))[-1]
    assert shown[-1]["content"][0]["text"] == vlm.answer([conversation], **beam.kwargs())[0]  # one piece

    answer = "<|object_ref_start|>square<|object_ref_end|><|box_start|>(28,21),(84,63)<|box_end|>"
    monkeypatch.setattr(HFVLM, "decode", lambda self, tokens: [answer] * len(tokens))
    _, status, picture, _ = list(respond(handle, ChatSession(), [str(path)], "Where?", decoding, True))[-1]
    assert status == "Done: 1 box(es) drawn."
    assert picture.getpixel((28, 40)) != (255, 255, 255)  # the left edge at x = 28 pixels
    assert picture.getpixel((56, 42)) == (255, 255, 255)  # inside the box: untouched


def test_sft_of_a_family_under_deepspeed_zero3_in_two_processes(tmp_path) -> None:
    """torchrun x2 with ZeRO-3 (as tests/test_scale_out.py runs ours): transformers' from_pretrained would build a
    family's model inside deepspeed.zero.Init before the CPU process group exists and stop both processes; the
    weights load whole (`full_weights_on_load`) and the gathered model saved at the end has learnt."""
    import subprocess

    from helpers.training import distributed_env, torchrun

    model_dir = _tiny("qwen2_vl", tmp_path)
    data = make_sft_files(tmp_path / "data", n=8)
    out = tmp_path / "zero3"
    config = Path(__file__).resolve().parents[1] / "configs" / "ds_zero3.json"
    command = torchrun(
        2, "-m", "mllm", "train", "sft", str(model_dir), "--data", str(data), "--out", str(out)
    )
    command += ["--deepspeed", str(config), "--per-device-train-batch-size", "2", "--max-steps", "4"]
    command += ["--learning-rate", "1e-3", *TRAIN_FLAGS]
    result = subprocess.run(command, env=distributed_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert _dataset_loss(out, data) < _dataset_loss(model_dir, data) - 1.0


def test_family_items_the_model_cannot_take_are_refused_naming_them(tmp_path) -> None:
    """At batch time (a family's length is known once its processor expanded the images): an item over --max-length,
    and a multi-turn conversation LLaVA-1.5's template cannot label, are refused with the file and the item ids."""
    vlm = load_vlm(_tiny("llava", tmp_path), device="cpu")
    data = make_sft_files(tmp_path / "data", n=2)
    items = json.loads(data.read_text())
    items[1]["conversations"] += [
        {"role": "user", "content": "And the colour?"},
        {"role": "assistant", "content": "Red."},
    ]
    data.write_text(json.dumps(items))
    dataset = ConversationDataset(data)
    with pytest.raises(
        ValueError,
        match=rf"{re.escape(str(data))}: items \[0\] are \[\d+\] tokens long .* over --max-length 8",
    ):
        VLMCollator(vlm, 8, str(data))([dataset[0]])
    with pytest.raises(
        ValueError, match=rf"{re.escape(str(data))}, items \[1\]: conversation 0: this chat template"
    ):
        VLMCollator(vlm, 4096, str(data))([dataset[1]])
    assert VLMCollator(vlm, 4096, str(data))([dataset[0]])["labels"].shape[0] == 1
