"""tokenthin.calibrate on vision-language models: the language model's prefill FLOPs model, the site / keep and
two-stage searches, the JSON round trip, apply(schedule=) and the refusals (tiny random LLaVA and Qwen2-VL)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

import tokenthin
from tiny_vlm import PROMPTS, batch, generate, llava, pixels, qwen, qwen_inputs
from tokenthin.adapters.registry import find_adapter
from tokenthin.calibration import CalibratedSchedule, calibrate
from tokenthin.calibration.vlm import Candidate, Fidelity, _solve, prompt_tokens
from tokenthin.errors import BudgetError, InputMismatchError, TokenThinError
from tokenthin.flops import lm_layer_flops
from tokenthin.methods.base import get
from tokenthin.vlm.cost import layer_tokens, prefill_fraction
from tokenthin.vlm.schedule import VLMSchedule


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return llava()


@pytest.fixture(scope="module")
def samples() -> list[dict[str, torch.Tensor]]:
    ids, mask = batch(PROMPTS)
    ids2, mask2 = batch(PROMPTS[:2])
    return [
        {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels(3)},
        {"input_ids": ids2, "attention_mask": mask2, "pixel_values": pixels(2, seed=5)},
    ]


@pytest.fixture(scope="module")
def fastv(model, samples) -> CalibratedSchedule:
    return calibrate(model, "fastv", flops=0.85, samples=samples, progress=False)


def _last_logits(model: torch.nn.Module, samples: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(**s, use_cache=False).logits[:, -1] for s in samples])


# ----------------------------------------------------------------------------- the FLOPs model


def test_lm_layer_flops_equal_the_flop_counter() -> None:
    m = llava(attn="eager")  # the CPU SDPA kernel is not counted by torch.utils.flop_counter; eager's matmuls are
    d = find_adapter(m).lm_dims()
    for n in (5, 22):
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            m.model.language_model(inputs_embeds=torch.randn(1, n, d.hidden), use_cache=False)
        assert fc.get_total_flops() == d.num_layers * lm_layer_flops(n, d)


def test_layer_tokens_follow_the_runtime(model, samples) -> None:
    """The analytic counts are the runtime's: after the last stage each prompt keeps what layer_tokens says."""
    prompts = prompt_tokens(model, samples[:1])
    assert [v for _, v in prompts] == [16, 16, 16] and [t for t, _ in prompts] == [len(p) - 16 for p in PROMPTS]
    for kw, vs in [
        ({"method": "fastv", "keep": 0.3, "site": "llm:1"}, VLMSchedule(None, ((1, 0.3),))),
        ({"method": "divprune", "keep": 0.4, "site": "output"}, VLMSchedule(0.4)),
        ({"method": "todre", "keep": 0.5, "llm_keep": 0.25}, VLMSchedule(0.5, ((2, 0.25),))),
    ]:
        with tokenthin.applied(model, **kw):
            with torch.no_grad():
                model(**samples[0], use_cache=False)
            kept = tokenthin.runtime_of(model).last.kept
        assert kept == [layer_tokens(t, v, vs, 4)[-1] - t for t, v in prompts], kw


# ----------------------------------------------------------------------------- single-site search (FastV)


def test_fastv_search_meets_the_target_and_picks_the_most_faithful_site(model, samples, fastv) -> None:
    assert fastv.site == "llm" and fastv.site_name == f"llm:{fastv.layer}" and fastv.flops <= 0.85
    assert fastv.samples == 2 and fastv.images == 5 and fastv.forwards >= 3 and fastv.seconds > 0
    assert fastv.baseline_fidelity is not None and fastv.fidelity >= fastv.baseline_fidelity
    # every site, independently: none is more faithful than the one returned
    prompts, cls = prompt_tokens(model, samples), get("fastv")
    d = find_adapter(model).lm_dims()
    fid = Fidelity(model, "fastv", samples, "logits", 0, tqdm(disable=True))
    scores = {}
    for k in range(3):
        solved = _solve(cls, {}, f"llm:{k}", {}, 0.85, prompts, d)
        assert solved is not None
        assert prefill_fraction(prompts, solved[1], d) <= 0.85
        scores[k] = fid(Candidate(f"llm:{k}", solved[0]))
    assert len(scores) == 3 and max(scores.values()) == pytest.approx(fastv.fidelity)
    assert scores[fastv.layer] == pytest.approx(fastv.fidelity)


def test_schedule_round_trips_and_apply_reproduces_the_candidate(model, samples, fastv, tmp_path) -> None:
    back = CalibratedSchedule.load(fastv.save(tmp_path / "fastv.json"))
    assert back == fastv and back.is_vlm
    ref = _last_logits(model, samples)
    with tokenthin.applied(model, "fastv", site=fastv.site_name, keep=fastv.keep):
        want = _last_logits(model, samples)
    with tokenthin.applied(model, "fastv", schedule=tmp_path / "fastv.json"):
        got = _last_logits(model, samples)
        ids, mask = batch(PROMPTS)
        new, _ = generate(model, ids, mask, pixels(3), new=3)
        assert new.shape == (3, 3)
    assert torch.equal(got, want)
    assert F.cosine_similarity(got, ref, dim=-1).mean().item() == pytest.approx(fastv.fidelity, abs=1e-5)


def test_several_targets_and_objectives(model, samples) -> None:
    found = calibrate(model, "divprune", flops=[0.9, 0.6], samples=samples[:1], objective="kl", progress=False)
    assert [s.flops_target for s in found] == [0.9, 0.6] and all(s.flops <= s.flops_target for s in found)
    assert found[0].keep >= found[1].keep and all(s.objective == "kl" and 0 < s.fidelity <= 1 for s in found)
    assert found[0].site_name in ("output", "llm:0", "llm:1", "llm:2")
    h = calibrate(model, "visionzip", flops=0.7, samples=samples[0], objective="hidden", progress=False)
    assert h.site == "output" and h.objective == "hidden" and h.fidelity == h.baseline_fidelity  # one candidate


def test_qwen2_vl(samples) -> None:
    m, inputs = qwen("2"), qwen_inputs()
    s = calibrate(m, "fastv", flops=0.9, samples=[inputs], progress=False)
    assert s.site == "llm" and s.flops <= 0.9 and s.host == "qwen2_vl"
    with tokenthin.applied(m, "fastv", site=s.site_name, keep=s.keep):
        want = _last_logits(m, [inputs])
    with tokenthin.applied(m, "fastv", schedule=s):
        assert torch.equal(_last_logits(m, [inputs]), want)


# ----------------------------------------------------------------------------- two-stage methods


def test_aim_searches_its_llm_schedule(model, samples) -> None:
    s = calibrate(model, "aim", flops=0.6, samples=samples[:1], progress=False)
    assert s.site == "output+llm" and s.search == "grid" and s.flops <= 0.6
    assert s.fidelity >= s.baseline_fidelity and s.llm and all(0 <= k < 3 for k, _ in s.llm)
    fixed = calibrate(model, "aim", flops=0.6, samples=samples[:1], step=0.25, progress=False)
    assert fixed.params["step"] == 0.25  # a parameter passed is not searched
    with tokenthin.applied(model, "aim", site="output+llm", keep=s.keep, **s.params):
        want = _last_logits(model, samples[:1])
    with tokenthin.applied(model, "aim", schedule=s):
        assert torch.equal(_last_logits(model, samples[:1]), want)
    with pytest.raises(TokenThinError, match="calibrated with parameters"):
        tokenthin.apply(model, "aim", schedule=s, tau=0.5)


def test_todre_searches_its_layer_and_keep(model, samples) -> None:
    s = calibrate(model, "todre", flops=0.5, samples=samples[:1], progress=False)
    assert s.site == "output+llm" and s.flops <= 0.5 and set(s.params) == {"llm_layer", "llm_keep"}
    assert s.llm == ((s.params["llm_layer"], float(s.params["llm_keep"])),)


# ----------------------------------------------------------------------------- refusals


def test_clear_errors(model, samples, fastv) -> None:
    with pytest.raises(InputMismatchError, match="samples="):
        calibrate(model, "fastv", flops=0.5, images=pixels(2), progress=False)
    with pytest.raises(InputMismatchError, match="samples="):
        calibrate(model, "fastv", flops=0.5, progress=False)
    with pytest.raises(InputMismatchError, match="pixel_values"):
        calibrate(model, "fastv", flops=0.5, samples=[{"input_ids": samples[0]["input_ids"]}], progress=False)
    with pytest.raises(TokenThinError, match="search="):
        calibrate(model, "fastv", flops=0.5, samples=samples, search="sigmoid", progress=False)
    with pytest.raises(BudgetError, match="unreachable"):
        calibrate(model, "fastv", flops=0.1, samples=samples, progress=False)
    with pytest.raises(TokenThinError, match="does not reduce"):
        calibrate(model, "downsample", flops=0.5, samples=samples, progress=False)
    with pytest.raises(BudgetError, match="tokenthin.calibrate"):
        tokenthin.apply(model, "fastv", flops=0.5)
    other = llava(text_layers=5)
    with pytest.raises(BudgetError, match="calibrate again"):
        tokenthin.apply(other, "fastv", schedule=fastv)


def test_schedules_stay_on_their_kind_of_model(fastv) -> None:
    from transformers import Dinov2Config, Dinov2Model

    cfg = Dinov2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, image_size=16, patch_size=4)
    enc = Dinov2Model(cfg).eval()
    with pytest.raises(TokenThinError, match="vision-language model"):
        tokenthin.apply(enc, "fastv", schedule=fastv)
    with pytest.raises(InputMismatchError, match="vision-language"):
        calibrate(enc, "divprune", flops=0.5, samples=[{}], progress=False)
    enc_sched = calibrate(enc, "divprune", flops=0.8, images=torch.randn(2, 3, 16, 16), progress=False)
    with pytest.raises(TokenThinError, match="vision encoder"):
        tokenthin.apply(llava(), "divprune", schedule=enc_sched)
    with pytest.raises(BudgetError, match="language-model layer"):
        CalibratedSchedule.from_dict({**fastv.to_dict(), "layer": None})


def test_cli_says_to_calibrate_a_vlm_in_python(tmp_path) -> None:
    from typer.testing import CliRunner

    from tokenthin.cli import app

    llava().save_pretrained(tmp_path)
    r = CliRunner().invoke(app, ["calibrate", "--method", "fastv", "--model", str(tmp_path)])
    assert r.exit_code != 0 and "samples=" in " ".join(r.output.split())


def test_inner_multimodal_model_needs_the_hidden_objective(model, samples) -> None:
    with pytest.raises(TokenThinError, match="objective='hidden'"):
        calibrate(model.model, "fastv", flops=0.85, samples=samples[:1], progress=False)
    s = calibrate(model.model, "fastv", flops=0.85, samples=samples[:1], objective="hidden", progress=False)
    assert s.site == "llm" and 0 < s.fidelity <= 1


def test_readme_vlm_calibration_example_runs(tmp_path, monkeypatch) -> None:
    """README 'Evaluate your VLM': the calibration snippet, on a tiny checkpoint saved like a real one."""
    import re
    from pathlib import Path

    from PIL import Image

    from tokenthin.eval.tiny import save_tiny

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text().split("## Evaluate your VLM", 1)[1]
    code = next(c for c in re.findall(r"```python\n(.*?)```", text, re.S) if "tokenthin.calibrate" in c)
    save_tiny("llava", tmp_path / "m")
    code = code.replace('"/models/llava-1.5-7b-hf", device="cuda"', f'"{tmp_path / "m"}", device="cpu"')
    monkeypatch.chdir(tmp_path)
    ns = {"tokenthin": tokenthin, "questions": ["What is it?", "Which colour?"]}
    ns["images"] = [Image.new("RGB", (40, 30), (200, 30, 30)), Image.new("RGB", (30, 50), (30, 30, 200))]
    exec(compile(code, "README.md", "exec"), ns)
    assert ns["sched"].site == "llm" and ns["sched"].flops <= 0.5 and (tmp_path / "fastv-0.5.json").exists()


# ----------------------------------------------------------------------------- every method, LLaVA-NeXT, batches


@pytest.mark.parametrize("method", sorted(m["name"] for m in tokenthin.methods()))
def test_every_method_calibrates_or_refuses_clearly(model, samples, method) -> None:
    """Registry-derived: each method either gets a schedule that meets the target and that apply(schedule=) runs
    as the candidate it measured, or a TokenThinError saying why."""
    try:
        s = calibrate(model, method, flops=0.85, samples=samples[:1], progress=False)
    except TokenThinError as e:
        assert method in str(e)
        return
    assert s.is_vlm and s.flops <= 0.85 and 0 < s.fidelity <= 1 + 1e-6
    with tokenthin.applied(model, method, site=s.site_name, keep=s.keep, **s.params):
        want = _last_logits(model, samples[:1])
    with tokenthin.applied(model, method, schedule=CalibratedSchedule.from_dict(s.to_dict())):
        assert torch.equal(_last_logits(model, samples[:1]), want)


def test_llava_next_row_ends_count_as_text() -> None:
    from tiny_vlm import llava_next, next_inputs

    m = llava_next()
    inputs = next_inputs(m)
    prompts = prompt_tokens(m, [inputs])
    n_img = (inputs["input_ids"] == m.config.image_token_id).sum(1).tolist()
    assert all(v < n for (_, v), n in zip(prompts, n_img))  # the row ends are not visual candidates
    s = calibrate(m, "fastv", flops=0.8, samples=[inputs], progress=False)
    with tokenthin.applied(m, "fastv", schedule=s):
        with torch.no_grad():
            m(**inputs, use_cache=False)
        kept = tokenthin.runtime_of(m).last.kept
    vs = VLMSchedule(None, s.llm)
    assert kept == [layer_tokens(t, v, vs, 4)[-1] - t for t, v in prompts]


def test_fidelity_is_the_same_for_one_batch_or_single_prompts(model, samples) -> None:
    ids, mask, pv = samples[0]["input_ids"], samples[0]["attention_mask"], samples[0]["pixel_values"]
    singles = [
        {"input_ids": ids[i : i + 1, mask[i].bool()], "pixel_values": pv[i : i + 1]} for i in range(ids.shape[0])
    ]
    c = Candidate("llm:1", 0.5)
    one = Fidelity(model, "fastv", samples[:1], "logits", 0, tqdm(disable=True))(c)
    each = Fidelity(model, "fastv", singles, "logits", 0, tqdm(disable=True))(c)
    assert one == pytest.approx(each, abs=1e-5)
    assert prompt_tokens(model, samples[:1]) == prompt_tokens(model, singles)
