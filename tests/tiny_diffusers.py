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


# ----- diffusion transformers (DiT, PixArt, SD3, Flux): tiny random models and their call arguments -----
DIT_DIM = 16  # 2 heads x 8: the hidden width of the tiny transformers below


def dit(sample: int = 8, seed: int = 0) -> nn.Module:
    """DiTTransformer2DModel (ada_norm_zero, 1000 classes): 2 blocks over a (sample/2)^2 patch grid."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    return DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,  # learned sigma, as DiT-XL/2
        num_layers=2,
        sample_size=sample,
        patch_size=2,
        num_embeds_ada_norm=1000,  # DiTPipeline's null class for guidance is 1000
    ).eval()


def pixart(sample: int = 8, seed: int = 0) -> nn.Module:
    """PixArtTransformer2DModel (ada_norm_single, cross-attention to TEXT-wide captions): 2 blocks."""
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    return PixArtTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        cross_attention_dim=DIT_DIM,
        sample_size=sample,
        patch_size=2,
        caption_channels=TEXT,
    ).eval()


def sd3(sample: int = 8, seed: int = 0, dual: bool = True) -> nn.Module:
    """SD3Transformer2DModel: 3 joint blocks (the last context_pre_only); with ``dual`` SD3.5's second
    self-attention in block 0 and rms q/k norms."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=sample,
        patch_size=2,
        in_channels=4,
        num_layers=3,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=TEXT,
        caption_projection_dim=DIT_DIM,
        pooled_projection_dim=DIT_DIM,
        out_channels=4,
        pos_embed_max_size=16,
        dual_attention_layers=(0,) if dual else (),
        qk_norm="rms_norm" if dual else None,
    ).eval()


def flux(seed: int = 0) -> nn.Module:
    """FluxTransformer2DModel: 2 double-stream + 2 single-stream blocks, rotary axes (4, 6, 6) over head dim 16."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=TEXT,
        pooled_projection_dim=DIT_DIM,
        axes_dims_rope=(4, 6, 6),
    ).eval()


def flux_ids(h: int, w: int, text: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """Flux's (img_ids (h*w, 3) with (0, row, column) in raster order, txt_ids (text, 3) zeros)."""
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return ids.reshape(h * w, 3), torch.zeros(text, 3)


def dit_input(model: nn.Module, b: int, hw: tuple[int, int] = (8, 8), seed: int = 0) -> torch.Tensor:
    """A random latent for a DiT / PixArt / SD3 transformer, or packed Flux tokens of an hw token grid."""
    g = torch.Generator().manual_seed(seed)
    if type(model).__name__ == "FluxTransformer2DModel":
        return torch.randn(b, hw[0] * hw[1], model.config.in_channels, generator=g)
    return torch.randn(b, model.config.in_channels, *hw, generator=g)


def dit_cond(model: nn.Module, b: int, seed: int = 1, text: int = 5) -> dict[str, Any]:
    """The conditioning arguments of a tiny transformer call (class labels, text states, pooled text), batch b."""
    g = torch.Generator().manual_seed(seed)
    name = type(model).__name__
    if name == "DiTTransformer2DModel":
        return {"class_labels": torch.randint(0, 1000, (b,), generator=g)}
    kw: dict[str, Any] = {"encoder_hidden_states": torch.randn(b, text, TEXT, generator=g)}
    if name in ("SD3Transformer2DModel", "FluxTransformer2DModel"):
        kw["pooled_projections"] = torch.randn(b, DIT_DIM, generator=g)
    return kw


def dit_run(model: nn.Module, x: torch.Tensor, t: Any = None, **kw: Any) -> torch.Tensor:
    """The transformer's output for ``x`` (conditions from dit_cond of the batch unless given)."""
    name = type(model).__name__
    kw = {**dit_cond(model, x.shape[0]), **kw}
    if name == "FluxTransformer2DModel":
        side = int(x.shape[1] ** 0.5)
        img, txt = flux_ids(side, x.shape[1] // side, kw["encoder_hidden_states"].shape[1])
        kw = {"img_ids": img, "txt_ids": txt, **kw}
        t = 0.5 if t is None else t
    t = 10 if t is None else t
    if not isinstance(t, torch.Tensor):
        t = torch.full((x.shape[0],), float(t))
    with torch.no_grad():
        return model(x, timestep=t, **kw).sample


def dit_pipeline() -> Any:
    """A tiny DiTPipeline: the tiny DiT, a tiny VAE, DDIM."""
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        block_out_channels=(8,),
        latent_channels=4,
        norm_num_groups=8,
    ).eval()
    return DiTPipeline(transformer=dit(), vae=vae, scheduler=DDIMScheduler())
