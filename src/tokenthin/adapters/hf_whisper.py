"""Hugging Face Whisper (``WhisperForConditionalGeneration``, ``WhisperModel``): the audio encoder's tokens are
reduced before the decoder reads them through cross-attention; ``generate()`` is untouched.

Tokens: the encoder turns 30 s of log-mel features (3000 frames; the feature extractor pads every clip to that)
into 1500 audio tokens, one per 20 ms, through two convolutions (the second with stride 2) and fixed positions.
They enter the first encoder layer as a 1-D sequence, :class:`AudioLayout` (``kind="sequence"``, ``grid == (1,
1500)``, no protected token), so pooling and neighbourhood methods work along time. Reductions act inside the
encoder (sites ``layers``, ``layer:k``: later layers and the decoder are cheaper) or at its output (``output``:
only the decoder's cross-attention reads fewer tokens). Site ``input`` is not offered: the encoder refuses
features that are not exactly 3000 frames long.

Silence (what was chosen, and why): most tokens of a short clip encode the zero padding. Marking them as the
layout's ``padding`` would make the runtime mask them from the first layer on and never keep them; measured once
(a development run, not a kept benchmark) on
Whisper tiny.en with the 10 pocketsphinx clips (:mod:`tokenthin.bench.speech`), masking every silence token in the
encoder and the cross-attention takes the WER from 0.05 to 3.0 (the decoder repeats itself until its token limit):
Whisper reads the end of speech from the silence. So the
layout's ``padding`` stays None (the model is exactly unchanged at zero budget) and the silence is described in
:attr:`AudioLayout.speech` instead: (B, 1500) True for encoder frames that cover real audio, from the feature
extractor's ``attention_mask`` when the caller passes it to the encoder (``return_attention_mask=True``; mel
frame pairs 2j, 2j + 1 -> token j), else from the features themselves (the extractor pads with zeros, whose
log-mel is the clamp floor, ``max - 8``, in all bins). Methods may read it to reduce silence first: on the same
clips, merging the encoder output's silence in windows of 10 tokens (with the log-size key bias) kept all 10
transcripts.

Seams (transformers 5.x, checked on 5.24): ``WhisperEncoder`` runs ``hidden_states = layer(hidden_states, None,
**kwargs)`` and ``WhisperEncoderLayer`` hands its ``attention_mask`` to ``WhisperAttention``, whose eager and SDPA
paths add it to the logits: a pre-hook passes the key bias as argument 1. ``q_proj`` / ``k_proj`` are separate
(``k_proj`` has no bias). Every decoder layer calls ``encoder_attn(..., attention_mask=encoder_attention_mask)``
with ``None`` at every step, also when the cross keys/values come from the cache: the pre-hook of
:mod:`tokenthin.adapters.hf_encoder_decoder` sets it to the runtime's cross bias (log sizes, padding).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import InputMismatchError
from ..flops import EncoderDims
from ..layout import Layout
from .contract import Adapter, BiasSource, Sink, capture_outputs, pre_hook_bias
from .hf_encoder_decoder import cross_attention_hook
from .hf_vision import unmerge_hidden
from .registry import register

_LOG_MEL_RANGE = 8.0  # WhisperFeatureExtractor clamps log10 mel energies to [max - 8, max]


@dataclass(frozen=True)
class AudioLayout(Layout):
    """A 1-D layout of audio tokens with ``speech``: (B, N) True where a token covers real audio (False: the
    window's silent padding, which stays content). None when not known."""

    speech: torch.Tensor | None = None


def speech_frames(features: torch.Tensor, attention_mask: torch.Tensor | None, tokens: int) -> torch.Tensor:
    """(B, tokens) True for encoder tokens over real audio: from the mel-frame ``attention_mask`` (B, frames) when
    given, else where any bin of the (B, mel, frames) features is above the extractor's clamp floor."""
    if attention_mask is not None:
        real = attention_mask.to(device=features.device, dtype=torch.bool)
    else:
        floor = features.amax(dim=(1, 2), keepdim=True) - _LOG_MEL_RANGE / 4  # the extractor scales by 1/4
        real = (features > floor + 1e-6).any(dim=1)
    stride = real.shape[-1] // tokens
    return real[:, : tokens * stride].reshape(real.shape[0], tokens, stride).any(-1)


def _is_whisper_encoder(m: Any) -> bool:
    return all(isinstance(getattr(m, a, None), nn.Module) for a in ("conv1", "conv2", "embed_positions")) and (
        isinstance(getattr(m, "layers", None), nn.ModuleList) and len(m.layers) > 0
    )


@register
class HFWhisperAdapter(Adapter):
    name = "hf_whisper"
    priority = 25  # above the generic encoder-decoder host
    sites = frozenset({"layers", "layer", "output"})
    signals = frozenset({"keys", "mean_attn"})  # no [CLS] token
    families = (
        "Hugging Face WhisperForConditionalGeneration / WhisperModel (audio encoder, decoder with cross-attention), "
        "with generate() and its KV cache"
    )

    def __init__(self, top: nn.Module, encoder: nn.Module, decoder: nn.Module) -> None:
        self.top, self.root, self.decoder = top, encoder, decoder
        self.layers = list(encoder.layers)
        cfg = encoder.config
        self.config = cfg
        self.family = getattr(cfg, "model_type", "whisper")
        self.num_protected = 0
        self.num_heads = int(cfg.encoder_attention_heads)
        hidden = int(cfg.d_model)
        att = self.layers[0].self_attn
        self.head_dim = int(getattr(att, "head_dim", hidden // self.num_heads))
        self.scale = float(getattr(att, "scaling", self.head_dim**-0.5))
        self.tokens = int(cfg.max_source_positions)
        self.frames = self.tokens * int(encoder.conv1.stride[0]) * int(encoder.conv2.stride[0])
        mel = int(cfg.num_mel_bins)
        # the stem per token: conv2 (hidden x hidden x 3) and conv1 over two mel frames (hidden x mel x 3 each)
        self.dims = EncoderDims(
            hidden=hidden,
            mlp_hidden=int(cfg.encoder_ffn_dim),
            mlp_mats=2,
            num_layers=len(self.layers),
            patch=(1, 3),
            channels=hidden + 2 * mel,
            num_protected=0,
        )
        self.cross = [layer.encoder_attn for layer in decoder.layers]
        self.default_layout = AudioLayout(protected=0, grid=(1, self.tokens), kind="sequence")

    @classmethod
    def detect(cls, model: nn.Module) -> HFWhisperAdapter | None:
        for m in model.modules():
            enc, dec = getattr(m, "encoder", None), getattr(m, "decoder", None)
            if not (_is_whisper_encoder(enc) and isinstance(getattr(dec, "layers", None), nn.ModuleList)):
                continue
            if all(hasattr(layer, "encoder_attn") for layer in dec.layers) and hasattr(enc.layers[0], "self_attn"):
                return cls(model, enc, dec)
        return None

    # ----- tokens -----
    def layout_for(self, size: tuple[int, int] | int | None) -> Layout:
        if size is None or size == self.tokens:
            return self.default_layout
        raise InputMismatchError(f"Whisper's encoder always reads {self.tokens} audio tokens (30 s), not {size}")

    def call_layout(self, args: tuple, kwargs: dict[str, Any]) -> tuple[Layout, int, torch.Tensor]:
        x = kwargs.get("input_features", args[0] if args else None)
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or not x.is_floating_point():
            raise InputMismatchError(
                "expected input_features, a float (batch, mel bins, frames) tensor from WhisperFeatureExtractor"
            )
        if x.shape[-1] != self.frames:
            raise InputMismatchError(
                f"input_features has {x.shape[-1]} frames; Whisper needs {self.frames} (pad every clip to 30 s, "
                "as WhisperFeatureExtractor does by default)"
            )
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        mask = mask if isinstance(mask, torch.Tensor) and mask.shape[-1] == self.frames else None
        speech = speech_frames(x.detach(), mask, self.tokens)
        return AudioLayout(protected=0, grid=(1, self.tokens), kind="sequence", speech=speech), x.shape[0], x

    def call_args(self, x: torch.Tensor) -> tuple[tuple, dict[str, Any]]:
        return (), {"input_features": x}

    # ----- layers and signals -----
    def bias_hooks(self, rt: BiasSource) -> list[Any]:
        """``WhisperEncoder`` calls ``layer(hidden_states, None, ...)``: the bias goes in as argument 1."""
        return pre_hook_bias(self.layers, rt, "attention_mask", 1, "attention_mask")

    def capture_qk(self, i: int, want_q: bool, sink: Sink) -> list[Any]:
        att = self.layers[i].self_attn
        return capture_outputs(att.q_proj, att.k_proj, want_q, sink)

    # ----- consumers -----
    def consumer_hooks(self, rt: BiasSource) -> list[Any]:
        """Every decoder layer's cross-attention gets the output tokens' key bias at every decoding step."""
        return [m.register_forward_pre_hook(cross_attention_hook(rt, m), with_kwargs=True) for m in self.cross]

    def finish(self, out: Any, source: torch.Tensor | None, unmerge: bool) -> Any:
        return unmerge_hidden(out, source, unmerge)

    def describe(self) -> dict[str, Any]:
        return {"audio_tokens": self.tokens, "mel_frames": self.frames, "seconds_per_token": 30.0 / self.tokens}

    def touched(self) -> list[str]:
        names = {m: n for n, m in self.top.named_modules()}
        out = [f"{names[self.root]} (pre/post hooks: open and close a call)"]
        for layer in self.layers:
            att = layer.self_attn
            out.append(f"{names[layer]} (mask pre-hook; output hook at reduction points)")
            out.append(f"{names[att.q_proj]}, {names[att.k_proj]} (output capture where a method needs scores)")
        out += [f"{names[m]} (cross-attention pre-hook: key bias)" for m in self.cross]
        return out
