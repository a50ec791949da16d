"""The defensive parser of LLM answers, and the no-model proposers, on adversarial and ordinary inputs."""

import pytest

from nacosae.naming.proposers import (
    ProposalContext,
    ScriptedProposer,
    VocabularyProposer,
    clean_name,
    format_best,
    parse_numbered_lines,
)
from nacosae.naming.vocab import load_vocabulary, normalise

CHATTY = """Sure! Here are 6 new image descriptions that should score higher:

1. "A red stop sign"
2) **an octagonal road sign** (score: 0.95)
3. 0.912: a red stop sign
- a STOP   sign
* a hexagon - 0.80
4. ???
5. <pad><pad><0x0A>
6. a very long runaway line that goes on and on and on and on and on and never ever stops at all
7.
(8) a blue circle.
9: 'traffic light'
I hope these help!"""


def test_chatty_answer():
    got = parse_numbered_lines(CHATTY, 10)
    assert got == ["A red stop sign", "an octagonal road sign", "a STOP sign", "a hexagon", "a blue circle", "traffic light"]


def test_stops_at_n_and_drops_tried_case_insensitively():
    assert parse_numbered_lines(CHATTY, 2) == ["A red stop sign", "an octagonal road sign"]
    got = parse_numbered_lines(CHATTY, 10, tried=["a red  STOP sign", "A Blue Circle"])
    assert "A red stop sign" not in got and "a blue circle" not in got and "a STOP sign" in got
    assert got[0] == "an octagonal road sign"


def test_runaway_and_gibberish_lines_dropped():
    text = "1. word " * 1 + "\n2. " + "word " * 13 + "\n3. 0.512\n4. }}{{\n5. ,,,,\n6. a b c"
    assert parse_numbered_lines(text, 10) == ["word"]
    assert parse_numbered_lines(text, 10, max_words=20) == ["word", " ".join(["word"] * 13)]


def test_unnumbered_answer_uses_plain_lines_but_not_headers():
    text = "New descriptions:\na cat\nA  Cat\n\na dog on grass\n"
    assert parse_numbered_lines(text, 5) == ["a cat", "a dog on grass"]


def test_numbered_lines_win_over_prose():
    text = "Here is my thinking about the feature\n1. a zebra\nThe zebra has stripes\n2. a tiger"
    assert parse_numbered_lines(text, 5) == ["a zebra", "a tiger"]


@pytest.mark.parametrize("line, item", [
    ("* (0.5) blue stripes", "blue stripes"), ("(0.5) blue", "blue"), ("1. a dog (0.5)", "a dog"), ("- [0.91] a cat", "a cat"),
    ("3. score: 0.7 - a cow", "a cow"), ("#4 the moon", "the moon"), ("10) ten pins", "ten pins"), ("0.75 - a kite", "a kite"),
])
def test_markers_and_copied_scores_are_stripped(line, item):
    assert parse_numbered_lines(line, 1) == [item]


@pytest.mark.parametrize("text", ["", "\n\n\n", "1.\n2.\n3.", "!!!!", "<unk> <unk> <unk>", "1. a\x01b\ufffdc dog"])
def test_empty_or_garbage_gives_nothing(text):
    assert parse_numbered_lines(text, 5) == []


def test_zero_requested():
    assert parse_numbered_lines(CHATTY, 0) == []


def test_clean_name():
    assert clean_name('Name: "Red Stop Signs" on poles everywhere') == "Red Stop Signs"
    assert clean_name("\n\n  striped zebra pattern on fabric and more") == "striped zebra pattern on"
    assert clean_name("Short name: stop sign\nDescriptions: ...") == "stop sign"
    assert clean_name("???", fallback="a red stop sign on a pole") == "a red stop sign"


def test_format_best_is_the_published_line_format():
    assert format_best([(0.91234, "a dog"), (0.5, "a cat")]) == "0.912: a dog\n0.500: a cat"


def test_scripted_proposer_follows_iterations_and_skips_tried():
    p = ScriptedProposer([["a", "bb", "cc"], ["dd", "a"]])
    assert p.propose([], 5, ProposalContext(0, 1)) == ["bb", "cc"]  # "a" is a one-letter non-word
    assert p.propose([], 5, ProposalContext(0, 2, tried=frozenset({"dd"}))) == []
    assert p.propose([], 1, ProposalContext(0, 9)) == ["dd"]  # past the script: the last batch
    assert p.summarise([(0.9, "a striped zebra on grass at dusk"), (0.1, "x")]) == "a striped zebra on"
    assert ScriptedProposer([["x"]], name="zebra").summarise([]) == "zebra"


@pytest.fixture(scope="module")
def vocab():
    return load_vocabulary()


def test_vocabulary_proposer_is_deterministic_new_and_bounded(vocab):
    p = VocabularyProposer(vocab)
    best = [(0.9, "dog"), (0.7, "striped cat"), (0.2, "oak")]
    ctx = ProposalContext(feature=3, iteration=1, tried=frozenset({"dog", "striped cat", "oak", "puppy"}))
    a, b = p.propose(best, 20, ctx), p.propose(best, 20, ctx)
    assert a == b and len(a) == 20
    assert len({normalise(x) for x in a}) == 20 and not set(a) & ctx.tried
    assert all(len(x.split()) <= p.max_words for x in a)
    other = p.propose(best, 20, ProposalContext(feature=3, iteration=2, tried=ctx.tried))
    assert other != a  # a new iteration samples anew
    # it moves along WordNet: some proposals are neighbours of "dog"
    assert set(a) & set(vocab.neighbours("dog"))


def test_vocabulary_proposer_summaries(vocab):
    p = VocabularyProposer(vocab)
    assert p.summarise([(0.9, "red stop sign"), (0.8, "stop sign"), (0.7, "red stop sign silhouette")]) == "stop sign"
    assert p.summarise([(0.9, "dog"), (0.8, "cat"), (0.7, "horse")]) == "mammal"  # the shared hypernym
    assert p.summarise([(0.9, "striped cat"), (0.8, "striped dog"), (0.8, "striped horse")]) == "striped mammal"
    assert p.summarise([]) == ""
    with pytest.raises(ValueError, match="op_weights"):
        VocabularyProposer(vocab, op_weights=(1, 1))
