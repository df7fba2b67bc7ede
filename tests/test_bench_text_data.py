"""WordNet sentences and the retrieval set: parsing on a small hand-written database, then the real one
(Debian ``wordnet-base``; those tests are marked ``real`` and skip without it)."""

from __future__ import annotations

import pytest

from tokenthin.bench import text_data as td
from tokenthin.data import DataMissingError

HEADER = "  1 This software and database is being provided to you, the LICENSEE, by Princeton University\n"
LINES = {
    "noun": [
        "00001740 03 n 01 entity 0 003 ~ 00001930 n 0000 | that which is perceived or known or inferred to have its "
        "own distinct existence (living or nonliving)  \n",
        "00217593 04 n 01 kill 1 002 @ 00217014 n 0000 + 00355365 v 0101 | the destruction of an enemy plane or "
        'ship or tank or missile; "the pilot reported two kills during the mission"  \n',
        '00218045 04 n 02 razing 0 tearing_down 0 000 | complete destruction of a building; "the razing of the old '
        'mill took the crew most of a week"; "short one"  \n',
    ],
    "verb": [
        '00001740 29 v 01 breathe 0 001 @ 00002000 v 0000 | draw air into, and expel out of, the lungs; "I can '
        'breathe better when the air is clean"; "The patient is respiring"  \n',
    ],
    "adj": [
        "00001740 00 a 01 able 0 000 | (usually followed by `to') having the necessary means or skill or know-how "
        'to do something; "able to swim"; "she was able to program her computer at the age of nine"  \n',
    ],
    "adv": ['00001740 02 r 01 a_cappella 0 000 | without musical accompaniment; "they performed a cappella"  \n'],
}


@pytest.fixture
def fake_root(tmp_path):
    for pos, lines in LINES.items():
        (tmp_path / f"data.{pos}").write_text(HEADER + "".join(lines))
    return tmp_path


def test_parses_words_definition_and_examples(fake_root):
    gl = td.glosses(fake_root)
    assert len(gl) == 6
    razing = gl[2]
    assert razing.words == ("razing", "tearing down")
    assert razing.definition == "complete destruction of a building"
    assert razing.examples == ("the razing of the old mill took the crew most of a week", "short one")
    assert razing.entry == "razing, tearing down: complete destruction of a building"
    assert gl[0].examples == () and gl[0].definition.endswith("(living or nonliving)")
    assert [g.pos for g in gl] == ["noun", "noun", "noun", "verb", "adj", "adv"]


def test_sentences_filter_by_length_and_are_seeded(fake_root):
    got = td.sentences(4, min_words=8, root=fake_root)
    assert sorted(got) == sorted(
        [
            "the pilot reported two kills during the mission",
            "the razing of the old mill took the crew most of a week",
            "I can breathe better when the air is clean",
            "she was able to program her computer at the age of nine",
        ]
    )
    assert td.sentences(4, root=fake_root, seed=0) == got
    assert {tuple(td.sentences(4, root=fake_root, seed=s)) for s in range(6)} != {tuple(got)}
    with pytest.raises(ValueError, match="asked for n=5"):
        td.sentences(5, root=fake_root)
    with pytest.raises(ValueError, match="min_words"):
        td.sentences(1, min_words=9, max_words=8, root=fake_root)


def test_retrieval_targets_are_the_query_synsets(fake_root):
    rs = td.retrieval_set(3, 5, root=fake_root)
    assert len(rs.queries) == 3 and len(rs.corpus) == 5 and len(set(rs.corpus)) == 5
    by_query = {q: rs.corpus[t] for q, t in zip(rs.queries, rs.targets)}
    assert by_query["the pilot reported two kills during the mission"].startswith("kill: the destruction")
    assert by_query["I can breathe better when the air is clean"].startswith("breathe: draw air")
    # "a cappella" has no long example and a 3-word definition: neither a query nor an entry
    assert not any(c.startswith("a cappella") for c in rs.corpus)
    with pytest.raises(ValueError, match="offers"):
        td.retrieval_set(5, root=fake_root)


def test_missing_wordnet_names_the_debian_package(tmp_path):
    with pytest.raises(DataMissingError, match="apt-get install wordnet-base"):
        td.glosses(tmp_path)


@pytest.fixture(scope="module")
def wordnet():
    try:
        return td.glosses()
    except DataMissingError as exc:
        pytest.skip(str(exc))


@pytest.mark.real
def test_real_wordnet(wordnet):
    assert len(wordnet) > 100_000
    got = td.sentences(500)
    assert len(set(got)) == 500 and all(8 <= len(s.split()) <= 60 for s in got)
    assert got == td.sentences(500)
    rs = td.retrieval_set(200)
    assert len(rs.corpus) == 800 and len(set(rs.targets)) == 200
    assert not set(rs.queries) & set(rs.corpus)
