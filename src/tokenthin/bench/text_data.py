"""Real English sentences for text-encoder benchmarks, read offline from WordNet 3.0.

Source: the Debian package ``wordnet-base`` (``apt-get install wordnet-base``), which installs Princeton's
WordNet 3.0 database under ``/usr/share/wordnet/`` (``data.noun``, ``data.verb``, ``data.adj``, ``data.adv``).
Licence: the WordNet 3.0 licence (permissive, BSD-like: use, copy, modify and distribute for any purpose without
fee, keeping Princeton's copyright notice: "WordNet 3.0 Copyright 2006 by Princeton University. All rights
reserved."). The data is read at run time, never copied into tokenthin.

Every synset line of a ``data.*`` file ends with a gloss, ``| definition; "example one"; "example two"``. The
examples are real English sentences written by the lexicographers (usage examples and attributed quotations);
the definition explains the synset's words.

* :func:`glosses` - every synset: part of speech, offset, words, definition, examples (file order).
* :func:`sentences` - ``n`` example sentences of ``min_words``..``max_words`` words (default 8-60), in a
  seeded order (deterministic for a given WordNet file and seed).
* :func:`retrieval_set` - a query set for retrieval agreement: each query is an example sentence of one synset;
  the corpus holds that synset's ``"words: definition"`` entry (its target) plus the entries of other synsets as
  distractors. A text encoder embeds both sides; top-1 by cosine over the corpus is its answer. The benchmark
  compares the reduced model's answer with the unreduced model's (agreement) and both with the target.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data import DataMissingError

__all__ = [
    "POS_FILES",
    "WORDNET_ROOT",
    "Gloss",
    "RetrievalSet",
    "glosses",
    "retrieval_set",
    "sentences",
]

WORDNET_ROOT = Path("/usr/share/wordnet")
POS_FILES: tuple[str, ...] = ("noun", "verb", "adj", "adv")
_HINT = "install the Debian package (as root): apt-get install wordnet-base"
_QUOTED = re.compile(r'"([^"]+)"')


@dataclass(frozen=True)
class Gloss:
    """One WordNet synset: ``pos`` (noun/verb/adj/adv), byte ``offset`` in its data file, its ``words``
    (underscores turned into spaces), ``definition`` and the quoted ``examples``."""

    pos: str
    offset: int
    words: tuple[str, ...]
    definition: str
    examples: tuple[str, ...]

    @property
    def entry(self) -> str:
        """``"word1, word2: definition"``, the corpus text of this synset."""
        return f"{', '.join(self.words)}: {self.definition}"


@dataclass(frozen=True)
class RetrievalSet:
    """``queries[i]`` is an example sentence whose own synset's entry is ``corpus[targets[i]]``."""

    queries: tuple[str, ...]
    corpus: tuple[str, ...]
    targets: tuple[int, ...]


def _parse_line(pos: str, line: str) -> Gloss | None:
    if line.startswith("  ") or " | " not in line:  # licence header lines start with two spaces
        return None
    head, gloss = line.split(" | ", 1)
    offset, _lex, _type, hex_count, rest = head.split(" ", 4)  # then word, lex_id pairs, then pointers
    count = int(hex_count, 16)
    words = tuple(w.replace("_", " ") for w in rest.split(" ", 2 * count)[: 2 * count : 2])
    gloss = gloss.strip()
    first_quote = gloss.find('"')
    if first_quote < 0:
        return Gloss(pos, int(offset), words, gloss.rstrip(";").strip(), ())
    definition = gloss[:first_quote].strip().rstrip(";").strip()
    examples = tuple(" ".join(e.split()) for e in _QUOTED.findall(gloss, first_quote))
    return Gloss(pos, int(offset), words, definition, examples)


@functools.lru_cache(maxsize=2)
def _glosses(root: str) -> tuple[Gloss, ...]:
    folder = Path(root)
    out: list[Gloss] = []
    for pos in POS_FILES:
        path = folder / f"data.{pos}"
        if not path.is_file():
            raise DataMissingError(f"WordNet file {path} not found; {_HINT}")
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                parsed = [_parse_line(pos, line) for line in f]
        except (OSError, ValueError, IndexError) as exc:
            raise DataMissingError(
                f"cannot read WordNet file {path} ({exc}); apt-get install --reinstall wordnet-base"
            ) from exc
        out.extend(g for g in parsed if g is not None)
    if not out:
        raise DataMissingError(f"no synsets in {folder}; apt-get install --reinstall wordnet-base")
    return tuple(out)


def glosses(root: str | Path | None = None) -> tuple[Gloss, ...]:
    """Every synset of WordNet's four data files, in file order (nouns, verbs, adjectives, adverbs); about
    117 000. ``root`` overrides ``/usr/share/wordnet``. Parsed once per process."""
    return _glosses(str(WORDNET_ROOT if root is None else Path(root)))


def _check_lengths(min_words: int, max_words: int) -> None:
    if not 1 <= min_words <= max_words:
        raise ValueError(f"need 1 <= min_words <= max_words, got {min_words}, {max_words}")


def _examples(min_words: int, max_words: int, root: str | Path | None) -> list[tuple[int, str]]:
    """(synset index, example) for every example of a sensible length, first occurrence of a text only."""
    seen: set[str] = set()
    out = []
    for i, g in enumerate(glosses(root)):
        for example in g.examples:
            if min_words <= len(example.split()) <= max_words and example not in seen:
                seen.add(example)
                out.append((i, example))
    return out


def sentences(
    n: int, min_words: int = 8, max_words: int = 60, seed: int = 0, *, root: str | Path | None = None
) -> list[str]:
    """``n`` distinct WordNet example sentences of ``min_words``..``max_words`` whitespace words, in an order
    drawn with ``seed`` (about 12 800 are available at the default 8-60)."""
    _check_lengths(min_words, max_words)
    pool = _examples(min_words, max_words, root)
    if not 0 <= n <= len(pool):
        raise ValueError(f"WordNet has {len(pool)} examples of {min_words}-{max_words} words; asked for n={n}")
    order = np.random.default_rng(seed).permutation(len(pool))[:n]
    return [pool[i][1] for i in order]


def retrieval_set(
    n_queries: int,
    n_corpus: int | None = None,
    min_words: int = 8,
    max_words: int = 60,
    seed: int = 0,
    *,
    root: str | Path | None = None,
) -> RetrievalSet:
    """Queries and a corpus for top-1 retrieval agreement.

    ``n_queries`` synsets are drawn with ``seed`` among those with an example of ``min_words``..``max_words``
    words and a definition of at least 4 words; each gives one query (its first such example) and its corpus
    entry. ``n_corpus`` (default ``4 * n_queries``) entries in all: the targets plus distractor entries of
    other synsets with such a definition, drawn with the same seed, shuffled together.
    """
    _check_lengths(min_words, max_words)
    n_corpus = 4 * n_queries if n_corpus is None else n_corpus
    if n_queries < 1 or n_corpus < n_queries:
        raise ValueError(f"need 1 <= n_queries <= n_corpus, got {n_queries}, {n_corpus}")
    all_glosses = glosses(root)
    usable = [i for i, g in enumerate(all_glosses) if len(g.definition.split()) >= 4]
    usable_set = set(usable)
    first: dict[int, str] = {}
    for i, example in _examples(min_words, max_words, root):
        if i in usable_set:
            first.setdefault(i, example)
    with_query = sorted(first)
    if n_queries > len(with_query) or n_corpus > len(usable):
        raise ValueError(
            f"WordNet offers {len(with_query)} queries and {len(usable)} entries; asked for {n_queries}, {n_corpus}"
        )
    rng = np.random.default_rng(seed)
    chosen = [with_query[i] for i in rng.permutation(len(with_query))[:n_queries]]
    chosen_set = set(chosen)
    others = [i for i in usable if i not in chosen_set]
    distract = [others[i] for i in rng.permutation(len(others))[: n_corpus - n_queries]]
    members = [chosen[i] if i < n_queries else distract[i - n_queries] for i in rng.permutation(n_corpus)]
    where = {synset: k for k, synset in enumerate(members)}
    return RetrievalSet(
        queries=tuple(first[s] for s in chosen),
        corpus=tuple(all_glosses[s].entry for s in members),
        targets=tuple(where[s] for s in chosen),
    )
