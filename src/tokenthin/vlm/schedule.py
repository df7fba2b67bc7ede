"""Where a method reduces on a vision-language model: the site grammar (``output``, ``llm:k``, ``output+llm``)
parsed into a :class:`VLMSchedule`."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import SiteError
from ..methods.base import Method


@dataclass(frozen=True)
class VLMSchedule:
    """Where a method reduces: before the language model (``output_keep``) and/or after language-model layers
    (``llm``: (k, keep) pairs, ascending k). A fractional keep inside the language model is a fraction of the visual
    tokens that entered it; a count is a count."""

    output_keep: float | int | None
    llm: tuple[tuple[int, float | int], ...] = ()
    keep: float | int | None = None  # what the caller asked for (describe())

    @property
    def site(self) -> str:
        parts = (["output"] if self.output_keep is not None else []) + [f"llm:{k}" for k, _ in self.llm]
        return "+".join(parts)

    def describe(self) -> str:
        return f"site={self.site} keep={self.keep}"


def parse_vlm_site(site: str | None, keep: float | int, num_lm_layers: int, method: Method) -> VLMSchedule:
    """The schedule of ``method`` at ``site`` (None: the method's default) on a language model of
    ``num_lm_layers`` layers, or a :class:`SiteError` naming the sites that exist."""
    cls = type(method)
    if "output+llm" in cls.sites:  # a two-stage method (AIM, ToDRE): its own in-LLM schedule
        s = (site or "output+llm").strip().lower()
        if s != "output+llm":
            raise SiteError(
                f"method '{cls.name}' reduces before and inside the language model; its site is 'output+llm' "
                "(tune the in-LLM stage with its parameters)"
            )
        return VLMSchedule(output_keep=keep, llm=tuple(method.llm_points(num_lm_layers)), keep=keep)
    default = cls.default_site if cls.default_site.startswith("llm") else "output"
    s = (site or default).strip().lower()
    if s == "output":
        if not ({"output", "layer"} & set(cls.sites)):
            raise SiteError(f"method '{cls.name}' does not work before the language model; its sites: {cls.sites}")
        return VLMSchedule(output_keep=keep, keep=keep)
    if s.startswith("llm:"):
        generic = cls.kind in ("prune", "merge") and not cls.signals and "layer" in cls.sites
        if "llm" not in cls.sites and not generic:  # generic: reads only the tokens, so works anywhere
            raise SiteError(
                f"method '{cls.name}' does not work inside the language model; sites here: 'output' "
                f"(its sites: {', '.join(cls.sites)})"
            )
        try:
            k = int(s.split(":", 1)[1])
        except ValueError:
            raise SiteError(f"site '{site}': write llm:k with an integer k") from None
        if k < 0:
            k += num_lm_layers
        if not 0 <= k < num_lm_layers - 1:
            raise SiteError(f"site '{site}': k must be in 0..{num_lm_layers - 2} (a later layer must read the result)")
        return VLMSchedule(output_keep=None, llm=((k, keep),), keep=keep)
    raise SiteError(
        f"site '{site}' does not exist on a vision-language model; its sites are 'output' (between the vision "
        f"projector and the language model) and 'llm:k' (after language-model layer k, 0..{num_lm_layers - 2})"
    )
