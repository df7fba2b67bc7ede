"""Labelled English speech from the Debian package ``pocketsphinx-testdata`` (BSD-2, Carnegie Mellon University).

``apt-get install pocketsphinx-testdata`` puts pocketsphinx's test clips under
``/usr/share/pocketsphinx/test/data/``. Two sets have reference transcriptions (lower case, no punctuation):

* ``librivox/``: 5 sentences (3-7 s) read from *Sense and Sensibility* (LibriVox); ``fileids`` lists them,
  ``transcription`` holds ``<s> text </s> (id)`` lines.
* ``cards/``: 5 short commands (1-3.5 s, "ten of clubs"); ``cards.fileids`` / ``cards.transcription``, same format.

All are RIFF WAV, mono, 16-bit PCM at 16 kHz; :func:`read_audio` also reads headerless ``.raw`` (16-bit
little-endian mono at 16 kHz, pocketsphinx's other format) and returns float32 in [-1, 1) at 16 kHz (a clip at
another rate is an error: resampling is not done here). Only numpy and the standard library's ``wave`` are used.
``$TOKENTHIN_SPEECH_DIR`` points elsewhere (a directory with the same layout).
"""

from __future__ import annotations

import os
import re
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import TokenThinError

__all__ = [
    "SAMPLE_RATE",
    "SETS",
    "Clip",
    "SpeechDataMissingError",
    "clips",
    "data_dir",
    "normalise",
    "read_audio",
    "wer",
    "word_errors",
]

SAMPLE_RATE = 16_000
DEFAULT_DIR = Path("/usr/share/pocketsphinx/test/data")
#: set name -> (its fileids list, its transcription file), relative to the set's directory
SETS: dict[str, tuple[str, str]] = {
    "librivox": ("fileids", "transcription"),
    "cards": ("cards.fileids", "cards.transcription"),
}
_LINE = re.compile(r"^\s*(?:<s>)?(?P<text>.*?)(?:</s>)?\s*\((?P<id>[^()]+)\)\s*$")


class SpeechDataMissingError(TokenThinError, FileNotFoundError):
    """The pocketsphinx test clips are not installed."""


@dataclass(frozen=True)
class Clip:
    """One labelled clip: ``set/id``, its audio file and its reference transcript (lower case)."""

    name: str
    path: Path
    text: str

    def audio(self) -> np.ndarray:
        return read_audio(self.path)

    @property
    def seconds(self) -> float:
        return len(self.audio()) / SAMPLE_RATE


def data_dir() -> Path:
    """``$TOKENTHIN_SPEECH_DIR`` or ``/usr/share/pocketsphinx/test/data``, checked to hold the clips."""
    root = Path(os.environ.get("TOKENTHIN_SPEECH_DIR") or DEFAULT_DIR)
    if not all((root / name / SETS[name][1]).is_file() for name in SETS):
        raise SpeechDataMissingError(
            f"no pocketsphinx test clips under {root}; install them with `apt-get install pocketsphinx-testdata` "
            "(Debian/Ubuntu, BSD-2) or set TOKENTHIN_SPEECH_DIR to a copy of that data directory"
        )
    return root


def _transcripts(path: Path) -> dict[str, str]:
    out = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        m = _LINE.match(line)
        if m is None:
            raise TokenThinError(f"{path}:{n}: expected '<s> text </s> (id)', got {line!r}")
        out[m["id"].strip()] = " ".join(m["text"].split())
    return out


def clips(sets: tuple[str, ...] = ("librivox", "cards")) -> list[Clip]:
    """The labelled clips of ``sets``, in the order of their fileids lists."""
    root = data_dir()
    out = []
    for name in sets:
        if name not in SETS:
            raise TokenThinError(f"unknown speech set {name!r}; known: {', '.join(SETS)}")
        ids_file, text_file = SETS[name]
        texts = _transcripts(root / name / text_file)
        for fid in (root / name / ids_file).read_text(encoding="utf-8").split():
            stem = Path(fid).name
            if stem not in texts:
                raise TokenThinError(f"{root / name / text_file} has no transcription for {stem}")
            path = root / name / f"{fid}.wav"
            if not path.is_file():
                raise SpeechDataMissingError(f"{path} is listed in {ids_file} but missing")
            out.append(Clip(f"{name}/{stem}", path, texts[stem]))
    return out


def read_audio(path: Path | str) -> np.ndarray:
    """Mono float32 samples in [-1, 1) at 16 kHz from a 16-bit PCM ``.wav`` or a headerless 16-bit ``.raw``."""
    path = Path(path)
    if path.suffix.lower() == ".raw":
        pcm = np.frombuffer(path.read_bytes(), dtype="<i2")
        return (pcm.astype(np.float32) / 32768.0).copy()
    with wave.open(str(path), "rb") as w:
        channels, width, rate = w.getnchannels(), w.getsampwidth(), w.getframerate()
        frames = w.readframes(w.getnframes())
    if width != 2:
        raise TokenThinError(f"{path}: {8 * width}-bit samples; only 16-bit PCM is read")
    if rate != SAMPLE_RATE:
        raise TokenThinError(f"{path}: {rate} Hz; resample it to {SAMPLE_RATE} Hz first")
    pcm = np.frombuffer(frames, dtype="<i2").reshape(-1, channels).astype(np.float32)
    return (pcm.mean(axis=1) / 32768.0).astype(np.float32)


_ONES = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen".split()
_ONES += ["seventeen", "eighteen", "nineteen"]
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_ABBREVIATIONS = {"mr": "mister", "mrs": "missus", "dr": "doctor", "st": "saint"}


def _spell(n: int) -> str:
    """0..999 in English words; larger numbers digit by digit."""
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else " " + _ONES[n % 10])
    if n < 1000:
        return _ONES[n // 100] + " hundred" + ("" if n % 100 == 0 else " " + _spell(n % 100))
    return " ".join(_ONES[int(d)] for d in str(n))


def normalise(text: str) -> str:
    """For word error rates against these references: lower case, punctuation and hyphens to spaces, numbers
    spelled out (``10`` -> ``ten``), a few abbreviations expanded (``Mr.`` -> ``mister``), apostrophes kept."""
    text = re.sub(r"[^a-z0-9' ]+", " ", text.lower())
    words = []
    for w in text.split():
        w = w.strip("'")
        if w.isdigit():
            words.append(_spell(int(w)))
        elif w:
            words.append(_ABBREVIATIONS.get(w, w))
    return " ".join(words)


def word_errors(hypothesis: str, reference: str) -> tuple[int, int]:
    """(word edits, reference words) after :func:`normalise` on both sides."""
    from .ocr import levenshtein

    hyp, ref = normalise(hypothesis).split(), normalise(reference).split()
    return levenshtein(hyp, ref), len(ref)


def wer(hypotheses: list[str], references: list[str]) -> float:
    """Corpus word error rate: total word edits / total reference words (normalised text)."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} references")
    counts = [word_errors(h, r) for h, r in zip(hypotheses, references)]
    return sum(e for e, _ in counts) / max(sum(n for _, n in counts), 1)
