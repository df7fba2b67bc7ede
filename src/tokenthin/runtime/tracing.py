"""torch.compile support of the encoder runtime.

In the fixed-count case (no padding, a method that keeps the same count in every sample) every reduction is planned
from the shapes alone, so ``torch.compile(model)`` traces the whole reduced forward as one graph. A reduction with
data-dependent shapes (a dynamic method such as dtome, a padded input) needs graph breaks inside the per-layer hooks.
Those are only safe when dynamo guards module hooks: by default (``skip_nnmodule_hook_guards = True``) it does not,
and once a break splits the forward into per-layer frames, the compiled code of one layer (guarded by its type, not
its identity) runs with the query/key capture hooks, and the runtime state, it was traced with: the next call loses
or misfiles the captured keys. So, unless hook guards are on, such a reduction is refused here with a clear error:
known ones before they are traced (:func:`check_traceable`), any other graph break inside tokenthin's hooks (a method
that reads a count back from the data) as soon as it shows (:func:`one_frame`).
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import UnsupportedModelError

_HOOK_GUARDS = "torch._dynamo.config.skip_nnmodule_hook_guards = False"


@torch.compiler.disable(reason=f"tokenthin: this reduction graph-breaks; compile with {_HOOK_GUARDS} or run eagerly")
def _refuse_compiled(method: str, why: str) -> None:
    """Raised from inside a ``torch.compile`` trace (the check runs at trace time, see :func:`check_traceable`);
    excluded from the trace, so the error reaches the caller at run time instead of being swallowed by the
    compiler's fallback to eager."""
    raise UnsupportedModelError(
        f"tokenthin: method '{method}': {why}; torch.compile cannot trace that whole, and the graph breaks it needs "
        f"inside the per-layer hooks are only safe when dynamo guards module hooks. Set {_HOOK_GUARDS} before "
        "compiling (it then runs with graph breaks, exactly), run the model uncompiled, or use a fixed-count method "
        "(e.g. 'tome' with flops=) on unpadded inputs, which compiles whole"
    )


def check_traceable(method: str, why: str) -> None:
    """At trace time: a reduction with data-dependent shapes is about to be traced. Dynamo does not guard module
    hooks by default, so once the graph breaks, the compiled code of one layer (guarded by type, not identity) can
    run another layer's hooks: refuse unless hook guards are on."""
    if torch._dynamo.config.skip_nnmodule_hook_guards:
        _refuse_compiled(method, why)


@torch._dynamo.assume_constant_result
def _compile_frame() -> str:
    """At trace time: the id of the frame being compiled (a constant in the graph)."""
    return str(torch._guards.CompileContext.current_compile_id())


def one_frame(st: Any, method: str) -> None:
    """Called by every per-layer hook: the hooks of one call must all run in one compiled frame (the whole reduced
    forward traced at once) or all eagerly; a mix means a graph break inside tokenthin's hooks (refused unless
    dynamo guards module hooks, see the module docstring)."""
    if not torch._dynamo.config.skip_nnmodule_hook_guards:
        return
    if torch.compiler.is_compiling():
        frame = _compile_frame()
        if st.frame is None:
            st.frame = frame
            return
        if st.frame == frame:
            return
    elif st.frame is None:
        return
    _refuse_compiled(method, "its reduction graph-breaks inside tokenthin's hooks (it reads counts back from data)")
