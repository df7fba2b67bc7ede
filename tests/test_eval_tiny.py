"""Tiny checkpoints that look real (tokenthin.eval.tiny): saved with their processors, loaded back by the auto classes,
laid out like the published models, and the path processor -> model -> method -> measured generation works."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import tokenthin
from tokenthin.eval.loading import chat_text, encode, load_vlm, question_messages
from tokenthin.eval.measure import generate_measured
from tokenthin.eval.tiny import KINDS, build_tiny, make_vqa_data, save_tiny
from tokenthin.eval.tiny_tokenizer import build_tokenizer
from tokenthin.eval.vqa_data import read_jsonl

CPU = torch.device("cpu")
# (kind, method, keep, site): one method per host that the host supports
APPLY = [
    ("llava", "visionzip", 8, "output"),
    ("llava-next", "fastervlm", 0.25, "output"),
    ("qwen2-vl", "divprune", 0.5, "output"),
    ("qwen2.5-vl", "fastv", 0.5, "llm:1"),
]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_vqa_data(tmp_path_factory.mktemp("vqa"))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    # LLaVA kinds at 112 px (8 x 8 patches of 14) to stay fast; the 336-px layout is checked on its own below
    return {k: save_tiny(k, root / k, image_size=112, max_pixels=112 * 112) for k in KINDS}


def _inputs(processor, data: Path, n: int = 3) -> dict[str, torch.Tensor]:
    samples = read_jsonl(data)[:n]
    texts = [chat_text(processor, question_messages(s.question)) for s in samples]
    return encode(processor, texts, [[s.load_image()] for s in samples], CPU, torch.float32)


def test_llava_15_layout_and_processor() -> None:
    model, proc = build_tiny("llava")  # the real 336 px / patch 14 tower: 576 visual tokens per image
    cfg = model.config
    assert (cfg.vision_config.image_size, cfg.vision_config.patch_size) == (336, 14)
    assert cfg.vision_feature_layer == -2 and cfg.vision_feature_select_strategy == "default"
    assert cfg.image_token_id == proc.tokenizer.convert_tokens_to_ids("<image>")
    from PIL import Image

    text = chat_text(proc, question_messages("What is it?"))
    assert text == "USER: <image>\nWhat is it? ASSISTANT:"
    batch = proc(images=[Image.new("RGB", (500, 300))], text=[text], return_tensors="pt")
    assert batch["pixel_values"].shape == (1, 3, 336, 336)
    assert int((batch["input_ids"] == cfg.image_token_id).sum()) == 576


def test_tokenizer_round_trips_any_text_and_knows_its_special_tokens() -> None:
    tok = build_tokenizer("chatml")
    text = "Über 3 façades? <|im_start|>user\n"
    ids = tok(text, add_special_tokens=False).input_ids
    assert tok.decode(ids) == text
    assert tok.convert_tokens_to_ids("<|im_start|>") in ids and tok.image_token == "<|image_pad|>"
    assert len(tok) <= 512 and tok.padding_side == "left"
    assert build_tokenizer("chatml").get_vocab() == tok.get_vocab()  # deterministic


@pytest.mark.parametrize("kind", KINDS)
def test_saved_checkpoint_loads_with_auto_classes_and_keeps_the_real_layout(checkpoints, data, kind) -> None:
    model, proc = load_vlm(checkpoints[kind], device="cpu", dtype="float32")
    cfg = model.config
    assert type(model).__name__.endswith("ForConditionalGeneration") and not model.training
    assert proc.tokenizer.padding_side == "left" and proc.chat_template
    if kind == "llava-next":
        assert cfg.image_grid_pinpoints == [[112, 224], [224, 112], [224, 224], [336, 112], [112, 336]]
    if kind.startswith("qwen"):
        text = cfg.text_config
        head = text.hidden_size // text.num_attention_heads
        assert text.rope_parameters["mrope_section"] == [2, 3, 3] and sum([2, 3, 3]) == head // 2
        assert cfg.vision_config.spatial_merge_size == 2 and cfg.vision_config.patch_size == 14
    inputs = _inputs(proc, data)
    assert (inputs["input_ids"] == cfg.image_token_id).sum(1).min() > 0
    with torch.inference_mode():
        plain = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    g = generate_measured(model, inputs, max_new_tokens=4)
    new = plain[:, inputs["input_ids"].shape[1] :].tolist()
    assert all(s == r[: len(s)] for s, r in zip(g.sequences, new))  # measuring changes nothing
    assert g.kept == g.visual_tokens and g.structure == [0, 0, 0] and g.decode_steps == len(new[0]) - 1
    assert g.ttft_s >= g.prefill_s > 0 and g.decode_s > 0 and g.peak_mb and g.peak_scope == "prefill"


@pytest.mark.parametrize(("kind", "method", "keep", "site"), APPLY)
def test_methods_apply_to_loaded_checkpoints_and_counts_are_logged(checkpoints, data, kind, method, keep, site):
    model, proc = load_vlm(checkpoints[kind], device="cpu", dtype="float32")
    inputs = _inputs(proc, data)
    full = generate_measured(model, inputs, max_new_tokens=3, count_flops=True)
    with tokenthin.applied(model, method, keep=keep, site=site):
        g = generate_measured(model, inputs, max_new_tokens=3, count_flops=True)
    content = [v - s for v, s in zip(g.visual_tokens, g.structure)]
    want = [keep] * 3 if isinstance(keep, int) else [round(keep * c) for c in content]
    assert g.kept == want and g.site == site
    assert g.visual_tokens == full.visual_tokens and g.visual_after == [k + s for k, s in zip(g.kept, g.structure)]
    assert all(a < b for a, b in zip(g.llm_tokens, full.llm_tokens))
    assert g.flops < full.flops
    if kind == "llava-next":
        assert min(g.structure) > 0  # row ends stay, outside the budget
