"""``tokenthin tiny-vlm`` (a tiny random checkpoint with its processor, for smoke tests) and ``tokenthin eval-task``
(an lmms-eval task over a local JSONL file)."""

from __future__ import annotations

import typer


def tiny_vlm_cmd(
    kind: str = typer.Argument(..., help="llava | llava-next | qwen2-vl | qwen2.5-vl"),
    out: str = typer.Argument(..., help="folder to save the checkpoint (and demo data) to"),
    image_size: int = typer.Option(336, help="LLaVA kinds: CLIP input size (a multiple of 14; 336 as LLaVA-1.5)"),
    data: bool = typer.Option(True, help="also write OUT/data/vqa.jsonl: 6 drawn images with questions"),
    seed: int = typer.Option(0, help="random seed of the weights"),
) -> None:
    """Save a tiny random checkpoint laid out like the real model (configs, processor, chat template); random
    weights say nothing about quality: use it to test a pipeline."""
    from .eval.tiny import KINDS, make_vqa_data, save_tiny

    if kind not in KINDS:
        raise typer.BadParameter(f"unknown kind '{kind}'; choose from {', '.join(KINDS)}")
    path = save_tiny(kind, out, image_size=image_size, seed=seed)
    typer.echo(f"wrote a tiny random {kind} checkpoint to {path}")
    if data:
        typer.echo(f"wrote demo questions to {make_vqa_data(path / 'data')}")


def eval_task_cmd(
    data: str = typer.Argument(..., help="JSONL file: one {image, question, answer (optional)} per line"),
    out: str = typer.Option("lmms_tasks", help="folder to write the task to (pass it as --include_path)"),
    name: str = typer.Option("tokenthin_vqa", help="task name (pass it as --tasks)"),
    max_new_tokens: int = typer.Option(16, help="tokens generated per answer"),
) -> None:
    """Write an lmms-eval task (YAML + data) over a local JSONL file of questions about images."""
    from .errors import TokenThinError
    from .eval.lmms_task import write_task

    try:
        path = write_task(data, out, name=name, max_new_tokens=max_new_tokens)
    except TokenThinError as e:
        raise typer.BadParameter(str(e)) from e
    typer.echo(
        f"wrote {path}\nrun it with: python -m lmms_eval --include_path {out} --tasks {name} --model tokenthin ..."
    )
