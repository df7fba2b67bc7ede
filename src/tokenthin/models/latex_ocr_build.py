"""latex-ocr-junia's architecture in stock transformers classes: the configurations, the embeddings subclass and
the (empty) ``VisionEncoderDecoderModel``; :func:`tokenthin.models.latex_ocr.load_latex_ocr` fills it.

Part of :mod:`tokenthin.models.latex_ocr` (import the names from there).

How it maps onto transformers (checked on 5.23)
-----------------------------------------------
No stock HF class reproduces either half exactly, so the closest stock classes are used and the
differences are made by configuration, by one small subclass and by module attributes, all listed here:

* **encoder** = ``IJepaModel`` (a ViT without CLS token; ``image_size=(128, 512)``, ``patch_size=8``,
  ``num_channels=1``, ``layer_norm_eps=1e-6``, ``hidden_act="gelu"``). ``ViTModel`` cannot be used: it
  always prepends a CLS token. Neither IJepa nor any other HF ViT-family encoder has a LayerNorm on the
  patch + position embeddings without also adding a CLS token (CLIP's ``pre_layrnorm`` does, with one),
  so ``model.encoder.embeddings`` is :class:`LatexOcrEmbeddings`, a subclass of ``IJepaEmbeddings`` that
  adds ``layernorm`` after the stock forward and makes ``interpolate_pos_encoding`` respect the 16x64
  grid (the stock one assumes a square grid). The encoder layers are stock ``IJepaLayer`` s, so the HF
  vision adapter's seams (``model.encoder.layers``, ``attention.q_proj/k_proj``) apply unchanged.
* **decoder** = ``MBartForCausalLM`` (pre-norm, ``layernorm_embedding``, final ``layer_norm``, learned
  positions, ``scale_embedding=False``, ``activation_function="gelu"``, ``add_cross_attention``). Two
  differences MBart cannot express through its config: its LayerNorms hard-code ``eps=1e-5`` (set to
  1e-6 on the module instances here) and its ``lm_head`` has no bias (replaced by an ``nn.Linear`` with
  bias). MBart's learned positions are offset by 2 (``position_ids + 2``), so the table gets two unused
  zero rows in front. GPT-2 (no embedding LayerNorm), TrOCR and BERT (post-norm) fit worse.

"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from tokenthin.models.cache import require
from tokenthin.models.latex_ocr_assets import BOS_ID, EOS_ID, PAD_ID, model_config

if TYPE_CHECKING:
    from transformers import VisionEncoderDecoderModel

_LAYER_NORM_EPS = 1e-6  # every LayerNorm in the package


@functools.cache
def embeddings_class() -> type:
    """:class:`LatexOcrEmbeddings`, built on first use so that importing this module needs no transformers."""
    require("transformers", "latex-ocr", extra="hf")
    from transformers.models.ijepa.modeling_ijepa import IJepaEmbeddings

    class LatexOcrEmbeddings(IJepaEmbeddings):
        """``IJepaEmbeddings`` (patch conv + learned positions, no CLS token) followed by a LayerNorm.

        ``interpolate_pos_encoding`` keeps the trained positions when the grid matches and otherwise
        resizes the real (rectangular) grid bicubically; the stock method assumes a square grid.
        """

        def __init__(self, config: Any) -> None:
            super().__init__(config, use_mask_token=False)
            self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
            self.grid = tuple(s // p for s, p in zip(self.image_size, _pair(config.patch_size)))

        def interpolate_pos_encoding(self, embeddings: torch.Tensor, height: int, width: int) -> torch.Tensor:
            patch_h, patch_w = _pair(self.patch_size)
            new = (height // patch_h, width // patch_w)
            if new == self.grid:
                return self.position_embeddings
            dim = self.position_embeddings.shape[-1]
            grid = self.position_embeddings.reshape(1, *self.grid, dim).permute(0, 3, 1, 2)
            grid = nn.functional.interpolate(grid.float(), size=new, mode="bicubic", align_corners=False)
            return grid.to(self.position_embeddings.dtype).permute(0, 2, 3, 1).reshape(1, -1, dim)

        def forward(
            self,
            pixel_values: torch.Tensor,
            bool_masked_pos: torch.BoolTensor | None = None,
            interpolate_pos_encoding: bool = False,
        ) -> torch.Tensor:
            # the stock forward adds the positions and applies dropout (0 here); the package applies its
            # dropout after the LayerNorm, which only matters in training
            embeddings = super().forward(pixel_values, bool_masked_pos, interpolate_pos_encoding)
            return self.layernorm(embeddings)

    # the public home of the class (tokenthin.models.latex_ocr.LatexOcrEmbeddings, a lazy module attribute)
    LatexOcrEmbeddings.__module__ = "tokenthin.models.latex_ocr"
    LatexOcrEmbeddings.__qualname__ = "LatexOcrEmbeddings"
    return LatexOcrEmbeddings


def _pair(v: Any) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (list, tuple)) else (int(v), int(v))


def _configs(attn_implementation: str) -> tuple[Any, Any]:
    transformers = require("transformers", "latex-ocr", extra="hf")
    cfg = model_config()
    hidden, heads, mlp = int(cfg["d_model"]), int(cfg["num_heads"]), int(cfg["mlp_dim"])
    encoder = transformers.IJepaConfig(
        hidden_size=hidden,
        num_hidden_layers=int(cfg["num_encoder_layers"]),
        num_attention_heads=heads,
        intermediate_size=mlp,
        hidden_act="gelu",
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        layer_norm_eps=_LAYER_NORM_EPS,
        image_size=(int(cfg["image_height"]), int(cfg["image_width"])),
        patch_size=int(cfg["patch_size"]),
        num_channels=1,
        qkv_bias=True,
        attn_implementation=attn_implementation,
    )
    decoder = transformers.MBartConfig(
        vocab_size=int(cfg["vocab_size"]),
        d_model=hidden,
        decoder_layers=int(cfg["num_decoder_layers"]),
        decoder_attention_heads=heads,
        decoder_ffn_dim=mlp,
        encoder_layers=0,
        activation_function="gelu",
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        decoder_layerdrop=0.0,
        max_position_embeddings=int(cfg["max_length"]),
        scale_embedding=False,
        pad_token_id=int(cfg["pad_token_id"]),
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        decoder_start_token_id=BOS_ID,
        forced_eos_token_id=None,
        is_decoder=True,
        add_cross_attention=True,
        is_encoder_decoder=False,
        tie_word_embeddings=False,
        use_cache=True,
        attn_implementation=attn_implementation,
    )
    return encoder, decoder


def build(attn_implementation: str) -> VisionEncoderDecoderModel:
    transformers = require("transformers", "latex-ocr", extra="hf")
    enc_cfg, dec_cfg = _configs(attn_implementation)
    encoder = transformers.IJepaModel(enc_cfg, add_pooling_layer=False)
    encoder.embeddings = embeddings_class()(enc_cfg)
    decoder = transformers.MBartForCausalLM(dec_cfg)
    for module in decoder.modules():
        if isinstance(module, nn.LayerNorm):
            module.eps = _LAYER_NORM_EPS  # MBart hard-codes 1e-5
    decoder.lm_head = nn.Linear(dec_cfg.d_model, dec_cfg.vocab_size, bias=True)
    model = transformers.VisionEncoderDecoderModel(encoder=encoder, decoder=decoder)
    config = model.config
    config.decoder_start_token_id, config.pad_token_id, config.eos_token_id = BOS_ID, PAD_ID, EOS_ID
    generation = model.generation_config
    generation.decoder_start_token_id, generation.bos_token_id = BOS_ID, BOS_ID
    generation.eos_token_id, generation.pad_token_id = EOS_ID, PAD_ID
    generation.forced_eos_token_id = None
    generation.suppress_tokens = [PAD_ID, BOS_ID]  # the package bans both while decoding
    return model
