"""The host contract: self-registered adapters, per-input budgets, one explain() shape."""

from __future__ import annotations

import ast
import pathlib

import pytest
import torch

import tokenthin
from tiny import build
from tokenthin.adapters.contract import Adapter, Layout
from tokenthin.adapters.registry import all_adapters, find_adapter
from tokenthin.budget import flops_fraction

SRC = pathlib.Path(tokenthin.__file__).parent


def test_adapters_register_themselves_in_priority_order() -> None:
    found = all_adapters()
    names = [a.name for a in found]
    assert {"hf_vision", "hf_encoder_decoder", "hf_llava", "hf_llava_next", "hf_qwen2vl"} <= set(names)
    assert [a.priority for a in found] == sorted((a.priority for a in found), reverse=True)
    assert all(issubclass(a, Adapter) for a in found)
    # a specialised host is tried before the encoder it contains
    assert names.index("hf_encoder_decoder") < names.index("hf_vision")
    assert names.index("hf_llava_next") < names.index("hf_llava")


def test_no_module_lists_the_adapters_and_the_runtime_names_no_host_keyword() -> None:
    runtime_files = sorted((SRC / "runtime").glob("*.py"))
    for f in [SRC / "api.py", *runtime_files, SRC / "adapters" / "registry.py", SRC / "adapters" / "contract.py"]:
        text = f.read_text()
        for adapter in ("HFVisionAdapter", "HFLlavaAdapter", "HFEncoderDecoderAdapter", "hf_vision"):
            assert adapter not in text.replace("hf_vision.py", ""), f"{f.name} names {adapter}"
    for f in runtime_files:
        for keyword in ("attention_mask", "pixel_values", "q_proj", "k_proj", "layer_takes_mask", "getattr("):
            assert keyword not in f.read_text(), f"{f.name} names {keyword}"


def test_the_vlm_runtime_names_no_hugging_face_internal() -> None:
    """Module names, call keywords, mask formats and rotary details of Hugging Face hosts live in the adapters."""
    banned = (
        "multi_modal_projector",
        "past_key_values",
        "cache_position",
        "q_proj",
        "self_attn",
        "position_embeddings",
        "position_ids",
        "inputs_embeds",
        "_attn_implementation",
        "attention_mask",
        "pixel_values",
        "input_ids",
        "hidden_states",
        "kwargs[",
        "kwargs.get(",
        "getattr(",
    )
    files = sorted((SRC / "vlm").glob("*.py"))
    assert len(files) >= 10
    for f in files:
        text = f.read_text()
        for keyword in banned:
            assert keyword not in text, f"vlm/{f.name} names {keyword}"
        assert len(text.splitlines()) < 400, f"vlm/{f.name} is over 400 lines"
    for f in sorted((SRC / "adapters").glob("*.py")):  # the adapters read no private state of the runtime
        assert "._layout" not in f.read_text() and "._projected" not in f.read_text(), f.name


def test_no_method_reads_untyped_extras() -> None:
    for f in sorted((SRC / "methods").glob("*.py")):
        assert "extras" not in f.read_text(), f"methods/{f.name} reads ReduceInput.extras"


def test_no_src_file_imports_in_a_circle_at_module_level() -> None:
    graph: dict[str, set[str]] = {}
    for f in SRC.rglob("*.py"):
        mod = ".".join(f.relative_to(SRC.parent).with_suffix("").parts).removesuffix(".__init__")
        pkg = mod if f.name == "__init__.py" else mod.rsplit(".", 1)[0]
        deps: set[str] = set()
        for node in ast.parse(f.read_text()).body:  # module-level imports only (lazy ones inside functions are fine)
            if isinstance(node, ast.ImportFrom) and node.level:
                base = pkg.rsplit(".", node.level - 1)[0] if node.level > 1 else pkg
                if node.module:
                    deps.add(f"{base}.{node.module}")
                    deps.update(f"{base}.{node.module}.{a.name}" for a in node.names)
                else:  # from . import x: the submodule x (the package itself is already initialising)
                    deps.update(f"{base}.{a.name}" for a in node.names)
        graph[mod] = deps
    mods = set(graph)

    def visit(m: str, stack: list[str]) -> None:
        for d in graph.get(m, ()):
            if d not in mods or d == m:
                continue
            if d in stack:
                pytest.fail(f"import cycle: {' -> '.join([*stack[stack.index(d) :], d])}")
            visit(d, [*stack, d])

    for m in mods:
        visit(m, [m])


def test_flops_budget_is_planned_for_the_size_fed(images: torch.Tensor) -> None:
    model = build("dinov2")  # configured for 32 px (8x8 patches); interpolates position embeddings
    big = torch.randn(2, 3, 64, 64)
    tokenthin.apply(model, "tome", flops=0.75)
    with torch.no_grad():
        model(pixel_values=images)
        small_tokens = tokenthin.info(model).tokens_per_layer
        model(pixel_values=big)
        big_tokens = tokenthin.info(model).tokens_per_layer
    assert small_tokens[0] == 65 and big_tokens[0] == 257
    assert big_tokens[-1] < big_tokens[0] and small_tokens[-1] < small_tokens[0]
    rt = tokenthin.runtime_of(model)
    assert len(rt._plans) == 2  # one plan per input shape, cached
    dims = find_adapter(model).dims
    for grid, plan in ((g, p) for (_, g, _), p in rt._plans.items()):
        assert abs(flops_fraction(plan, dims, grid) - 0.75) < 0.05  # each size meets the target
    # the same budget re-planned for 64 px equals a fresh apply with that size as its hint
    tokenthin.apply(model, "tome", flops=0.75, image_size=64, replace=True)
    assert tokenthin.runtime_of(model).schedule == rt._plans[(1, (16, 16), 1)]


def test_keep_fraction_is_of_each_input(images: torch.Tensor) -> None:
    model = build("vit")
    tokenthin.apply(model, "divprune", keep=0.25, site="output")
    with torch.no_grad():
        model(pixel_values=images)
        assert tokenthin.info(model).kept == [1 + 16] * images.shape[0]


def test_r_too_large_for_an_input_names_its_token_count() -> None:
    model = build("dinov2")
    tokenthin.apply(model, "tome", r=20)  # fine for 64 patches at the configured 32 px
    with pytest.raises(tokenthin.BudgetError, match="16 patch tokens"):
        model(pixel_values=torch.randn(1, 3, 16, 16))  # 4x4 = 16 patches cannot merge 20 after layer 0


@pytest.mark.parametrize("family", ["vit", "llava"])
def test_explain_has_one_shape(family: str) -> None:
    if family == "llava":
        from tiny_vlm import llava

        model = llava()
    else:
        model = build(family)
    e = tokenthin.explain(model)
    assert {"adapter", "family", "layers", "protected_tokens", "tokens", "sites", "touched_modules", "host"} <= set(e)
    assert isinstance(e["host"], dict) and e["sites"]


def test_layout_sequence_is_a_one_row_grid() -> None:
    lay = Layout.sequence(1, 10, padding=torch.ones(2, 11, dtype=torch.bool))
    assert lay.grid == (1, 10) and lay.kind == "sequence" and lay.tokens == 11 and lay.content == 10
    assert find_adapter(build("vit")).default_layout.grid == (8, 8)


@pytest.mark.parametrize("host", ["hf_vision", "hf_qwen2vl"])
def test_support_table_matches_apply(host: str) -> None:
    """tokenthin.support() (the README's methods x hosts table) says exactly which apply() calls are refused."""
    if host == "hf_qwen2vl":
        from tiny_vlm import qwen

        model = qwen()
    else:
        model = build("vit")
    for name, cls in tokenthin.api.all_methods().items():
        if name == "dtome":  # calibrates: its own tests
            continue
        reason = tokenthin.support(name, host)
        merging = cls.kind == "merge" and "layers" in cls.sites
        budget = {"r": 1} if merging and host == "hf_vision" else {"keep": 0.5}
        try:
            tokenthin.apply(model, name, **budget, replace=True)
            refused = None
        except (tokenthin.UnsupportedModelError, tokenthin.SiteError, tokenthin.TokenThinError) as e:
            refused = str(e)
        assert (reason is None) == (refused is None), (name, reason, refused)
        if tokenthin.is_applied(model):
            tokenthin.remove(model)
    assert {h["name"] for h in tokenthin.hosts()} >= {"hf_vision", "hf_qwen2vl"}


def test_every_registered_host_has_tests() -> None:
    """Adding a host means adding its tests: each adapter class is named by some test file."""
    tests = " ".join(
        p.read_text()
        for p in pathlib.Path(__file__).parent.glob("test_*.py")
        if p.resolve() != pathlib.Path(__file__).resolve()
    )
    for a in all_adapters():
        detected = f'"{a.__name__}"' in tests or a.__name__ in tests or f'"{a.name}"' in tests
        assert detected, f"no test names the host {a.__name__} ({a.name}); add tests/test_<host>.py"
