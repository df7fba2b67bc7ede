"""Local visual question answering data: a JSONL file, one question a line, and how answers are scored.

Each line is a JSON object:

* ``image``: path of the image (relative to the JSONL file's folder, or absolute); required;
* ``question``: the question text; required;
* ``answer``: the reference answer, or ``answers``: a list of accepted answers; optional (without one, only
  agreement with the unreduced model is measured);
* ``id``: a name for the line (default: its line number); ids must be unique;
* ``metric``: ``exact`` (the normalised answer equals a reference, the default) or ``contains`` (a normalised
  reference appears in the normalised answer as whole words).

Normalisation (VQA-style, light): lower case, punctuation dropped, the articles a / an / the dropped, whitespace
collapsed.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import TokenThinError

METRICS = ("exact", "contains")
_PUNCT = re.compile(r"[^\w\s]")
_ARTICLES = re.compile(r"\b(a|an|the)\b")


@dataclass(frozen=True)
class VQASample:
    id: str
    image: Path
    question: str
    answers: tuple[str, ...]
    metric: str
    index: int

    def load_image(self) -> Any:
        from PIL import Image

        with Image.open(self.image) as im:
            return im.convert("RGB")


def read_jsonl(path: str | Path) -> list[VQASample]:
    """The samples of a JSONL file (see the module docstring); a malformed line fails naming its line number."""
    p = Path(path)
    if not p.is_file():
        raise TokenThinError(f"no data file at {p}: give a JSONL file, one {{'image', 'question', 'answer'}} a line")
    out: list[VQASample] = []
    seen: set[str] = set()
    for n, raw in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not raw.strip():
            continue
        where = f"{p}:{n}"
        try:
            obj = json.loads(raw)
        except ValueError as e:
            raise TokenThinError(f"{where}: not JSON ({e})") from e
        if (
            not isinstance(obj, dict)
            or not isinstance(obj.get("image"), str)
            or not isinstance(obj.get("question"), str)
        ):
            raise TokenThinError(f"{where}: each line needs string fields 'image' and 'question'")
        answers = obj.get("answers", obj.get("answer", []))
        answers = [answers] if isinstance(answers, str) else answers
        if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
            raise TokenThinError(f"{where}: 'answer' must be a string or 'answers' a list of strings")
        metric = obj.get("metric", "exact")
        if metric not in METRICS:
            raise TokenThinError(f"{where}: metric '{metric}' is not one of {', '.join(METRICS)}")
        sid = str(obj.get("id", n))
        if sid in seen:
            raise TokenThinError(f"{where}: id '{sid}' appears twice; ids must be unique")
        seen.add(sid)
        img = Path(obj["image"])
        img = img if img.is_absolute() else (p.parent / img)
        if not img.is_file():
            raise TokenThinError(f"{where}: image {img} does not exist")
        out.append(VQASample(sid, img.resolve(), obj["question"], tuple(answers), metric, len(out)))
    if not out:
        raise TokenThinError(f"{p} has no samples")
    return out


def normalize(text: str) -> str:
    t = _PUNCT.sub(" ", text.lower())
    t = _ARTICLES.sub(" ", t)
    return " ".join(t.split())


def exact(pred: str, answers: tuple[str, ...] | list[str]) -> float:
    p = normalize(pred)
    return float(any(p == normalize(a) for a in answers))


def contains(pred: str, answers: tuple[str, ...] | list[str]) -> float:
    p = f" {normalize(pred)} "
    return float(any(normalize(a) and f" {normalize(a)} " in p for a in answers))


def score(pred: str, sample: VQASample) -> dict[str, float | None]:
    """``exact``, ``contains`` and ``correct`` (by the sample's metric) of an answer; ``None`` without references."""
    if not sample.answers:
        return {"exact": None, "contains": None, "correct": None}
    e, c = exact(pred, sample.answers), contains(pred, sample.answers)
    return {"exact": e, "contains": c, "correct": e if sample.metric == "exact" else c}
