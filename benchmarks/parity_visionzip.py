"""VisionZip's default vs ``official=True`` on the bundled real DINOv2-S (16 bundled images, 224 px):

1. the merge rule: the plan at the last layer's output applied to its tokens (size-weighted mean vs the release's
   ``target + mean(assigned)``), unmerged back over every patch; mean cosine to the unreduced patch tokens;
2. the selection as an encoder host applies it (site ``layer:k``; values and order are the vision-language
   runtime's): [CLS] cosine to the unreduced model.

Run: ``PYTHONPATH=src python benchmarks/parity_visionzip.py``."""

from __future__ import annotations

import torch

import tokenthin
from tokenthin.bench.main import _pixels, load_model
from tokenthin.data import imagenet_samples, load_images
from tokenthin.methods.base import OrderedPlan, ReduceInput, SignalSource, get
from tokenthin.ops import assign, ordered


class _Signals(SignalSource):
    has_cls = True

    def __init__(self, att: torch.Tensor, keys: torch.Tensor) -> None:
        self.att, self.k = att, keys

    def cls_attention(self, layer: int) -> torch.Tensor:
        return self.att[:, :, 0, :].mean(1)

    def keys(self, layer: int) -> torch.Tensor:
        return self.k


def main() -> None:
    enc = load_model("dinov2-s").encoder
    enc.set_attn_implementation("eager")
    x = _pixels(load_images([p for p, _ in imagenet_samples()[:16]]), 224)
    got: dict[str, torch.Tensor] = {}
    h = enc.encoder.layer[-1].attention.k_proj.register_forward_hook(lambda _m, _a, o: got.__setitem__("k", o))
    with torch.no_grad():
        out = enc(pixel_values=x, output_attentions=True, output_hidden_states=True)
    h.remove()
    hs, att = out.hidden_states[-1], out.attentions[-1]
    b, t, _ = hs.shape
    keys = got["k"].view(b, t, att.shape[1], -1).mean(2)
    inp = ReduceInput(
        x=hs,
        size=torch.ones(b, t),
        valid=torch.ones(b, t, dtype=torch.bool),
        num_protected=1,
        layer=11,
        num_layers=12,
        grid=(16, 16),
        pristine=True,
        signals=_Signals(att, keys),
    )
    for k in (32, 64, 128):
        row = []
        for official in (False, True):
            plan = get("visionzip")(official=official).reduce(inp, torch.full((b,), k))
            values = plan.values if isinstance(plan, OrderedPlan) else None
            y, _ = ordered.apply(hs, inp.size, OrderedPlan(plan[0], plan[1], None, values))  # positional slots
            src = assign.compose_source(torch.arange(t).expand(b, t), assign.build(plan[0], plan[1]))
            full = assign.unmerge(y, src)
            row.append(torch.nn.functional.cosine_similarity(full[:, 1:], hs[:, 1:], dim=-1).mean().item())
        print(f"keep={k}: patch cosine after unmerge  default {row[0]:.4f}  official {row[1]:.4f}")
    enc.set_attn_implementation("sdpa")
    with torch.no_grad():
        ref = enc(pixel_values=x).last_hidden_state[:, 0]
    for site in ("layer:3", "layer:6", "layer:9"):
        for k in (64, 128):
            row = []
            for official in (False, True):
                with tokenthin.applied(enc, "visionzip", keep=k, site=site, official=official), torch.no_grad():
                    cls = enc(pixel_values=x).last_hidden_state[:, 0]
                row.append(torch.nn.functional.cosine_similarity(cls, ref).mean().item())
            print(f"{site} keep={k}: CLS cosine  default {row[0]:.4f}  official {row[1]:.4f}")


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
