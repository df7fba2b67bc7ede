"""Runtime for vision-language hosts: visual tokens reduced before the language model (``site="output"``),
inside it after decoder layer k (``site="llm:k"``), or both, at several layers (``"output+llm"``, two-stage
methods such as AIM), or inside the vision tower (``"layers"`` / ``"layer:k"``), with ``generate()`` and its KV
cache intact.

One module per job, each function taking the call's state explicitly:

* :mod:`.schedule`: the site grammar (:class:`VLMSchedule`, :func:`parse_vlm_site`);
* :mod:`.setup`: building a runtime from a request;
* :mod:`.state`: per-call state (:class:`~.state.Call`, :class:`~.state.Prefix`, :class:`~.state.Carry`) and
  :class:`VLMInfo`;
* :mod:`.prefill`: the prefill (an image in the prompt, an empty cache): the method sees the sample's visual tokens,
  padded across the batch, with the vision tower's signals, the prompt's text embeddings and the host's views,
  rows and columns; its plan (keep mask and merge targets, :mod:`tokenthin.ops.assign`) turns into a shorter
  sequence per sample, re-padded on the left, with the attention mask and positions rebuilt (:mod:`.plan`,
  :mod:`.sequence`);
* :mod:`.decode`: decoding steps: the caller's mask and positions, which number the original prompt, translated to
  the shorter one;
* :mod:`.inllm`: reductions after language-model layer k; :mod:`.signals`: what methods score with;
* :mod:`.tower`: sites inside the vision tower; :mod:`.runtime`: :class:`VLMRuntime`, the hook wiring;
* :mod:`.cost`: the language model's analytic prefill FLOPs under a schedule (for ``tokenthin.calibrate``).

Positions (choices): at ``output`` a 1-D rotary host numbers the shorter prompt 0..T'-1 (the language model sees
it as a prompt with fewer image tokens, which is what every pre-LLM method's reference code feeds it). Inside the
language model (``llm:k``) kept tokens keep their original positions: layers 0..k already used them, and their
keys in layers 0..k stay in the cache at full length; layers after k hold only the kept tokens. Hosts with
multimodal rotary positions (Qwen2-VL) never renumber.

Budgets: before the language model a fractional ``keep`` is a fraction of each prompt's visual tokens; inside it,
of the visual tokens that entered the language model. Samples whose counts or grids differ are planned one at a
time (a selection takes one k); otherwise the whole batch is planned at once.

The Hugging Face seams (module names, call keywords, cache, mask formats, rotary) are all in
:mod:`tokenthin.adapters.hf_vlm` and the hosts :mod:`tokenthin.adapters.hf_llava`,
:mod:`tokenthin.adapters.hf_qwen2vl`; nothing here names them.
"""

from __future__ import annotations

from .runtime import VLMRuntime
from .schedule import VLMSchedule, parse_vlm_site
from .sequence import pack
from .state import VLMInfo
from .tower import CollapseSlots

__all__ = ["CollapseSlots", "VLMInfo", "VLMRuntime", "VLMSchedule", "pack", "parse_vlm_site"]
