"""Tiny random diffusers denoisers and a pipeline from config classes (no downloads), shared by tests and benches."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

TEXT = 32  # cross-attention width (the text encoder's hidden size)


def sd_unet(sample: int = 16, seed: int = 0) -> nn.Module:
    """SD 1.x-like: a BasicTransformerBlock with self- and cross-attention in every block, at levels 0 and 1."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=sample,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT,
        attention_head_dim=8,
        norm_num_groups=8,
    ).eval()


def sdxl_unet(sample: int = 16, seed: int = 0) -> nn.Module:
    """SDXL-like: no attention at the latent's resolution, 2 transformer blocks per transformer lower down, linear
    projections, text-time addition embeddings."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=sample,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2),
        cross_attention_dim=TEXT,
        attention_head_dim=8,
        norm_num_groups=8,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + TEXT,
    ).eval()


def plain_unet(sample: int = 16, seed: int = 0, shift: str = "scale_shift") -> nn.Module:
    """UNet2DModel with attention blocks at levels 0 and 1 (the mid block's attention has no group norm with
    ``scale_shift``, as in the OpenAI consistency-model UNets)."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=sample,
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=8,
        resnet_time_scale_shift=shift,
    ).eval()


def cond_kwargs(unet: nn.Module, batch: int, seed: int = 1) -> dict[str, Any]:
    """Call arguments besides sample and timestep: text states (and SDXL's added conditions)."""
    g = torch.Generator().manual_seed(seed)
    kw: dict[str, Any] = {"encoder_hidden_states": torch.randn(batch, 5, TEXT, generator=g)}
    if unet.config.addition_embed_type == "text_time":
        kw["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, TEXT, generator=g),
            "time_ids": torch.randn(batch, 6, generator=g),
        }
    return kw


def run(unet: nn.Module, x: torch.Tensor, t: Any = 10, **kw: Any) -> torch.Tensor:
    """The denoiser's output for ``x`` at timestep ``t`` (conditional UNets get cond_kwargs of the batch)."""
    with torch.no_grad():
        if hasattr(unet.config, "cross_attention_dim"):
            kw = {**cond_kwargs(unet, x.shape[0]), **kw}
        return unet(x, t, **kw).sample


def sd_pipeline() -> Any:
    """A tiny StableDiffusionPipeline: tiny UNet, VAE, CLIP text encoder, DDIM; no tokenizer (prompt_embeds)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        latent_channels=4,
        norm_num_groups=8,
    ).eval()
    text = CLIPTextModel(
        CLIPTextConfig(hidden_size=TEXT, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    ).eval()
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=None,
        unet=sd_unet(),
        scheduler=DDIMScheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
