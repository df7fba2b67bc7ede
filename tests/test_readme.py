"""The README's Python example runs as written (on a tiny model instead of downloaded weights)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from tiny import build

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs() -> None:
    code = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    code = code.replace("Dinov2Model.from_pretrained(...)", "_model")
    x = torch.randn(2, 3, 224, 224)
    model = build("dinov2")
    ns = {"_model": model, "x": x}
    exec(compile(code, "README.md", "exec"), ns)
    assert ns["out"].last_hidden_state.shape[0] == 2
