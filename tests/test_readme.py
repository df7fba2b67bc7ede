"""The README's Python example runs as written (on a tiny model instead of downloaded weights)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs() -> None:
    code = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    code = code.replace("Dinov2Model.from_pretrained(...)", "_model")
    x = torch.randn(2, 3, 224, 224)
    from transformers import Dinov2Config, Dinov2Model

    from tiny import SIZE

    # tiny widths, configured for the size fed (as a real DINOv2 would be for its images)
    cfg = Dinov2Config(**{**SIZE, "image_size": 224, "patch_size": 16, "num_hidden_layers": 6}, mlp_ratio=2)
    model = Dinov2Model(cfg).eval()
    ns = {"_model": model, "x": x}
    exec(compile(code, "README.md", "exec"), ns)
    assert ns["out"].last_hidden_state.shape[0] == 2


def test_methods_x_hosts_table_matches_the_registries() -> None:
    import tokenthin

    text = README.read_text().split("### Methods x hosts", 1)[1].split("\n### ", 1)[0]
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    hosts = ["hf_vision", "timm_vit", "hf_text", "hf_whisper", "hf_encoder_decoder", "hf_llava", "hf_llava_next"]
    hosts += ["hf_qwen2vl", "diffusers_unet", "diffusers_dit", "diffusers_sd3", "diffusers_flux"]
    assert {r.split("`")[1] for r in rows} == {m["name"] for m in tokenthin.methods()}
    for r in rows:
        name = r.split("`")[1]
        cells = [c.strip() for c in r.strip("|").split("|")[1:]]
        for host, c in zip(hosts, cells, strict=True):
            assert (c == "yes") == (tokenthin.support(name, host) is None), (name, host, c)
