"""The demo grammar: deterministic, its recogniser accepts what it generates and rejects what it should not, and
every minimal pair differs in exactly the intended feature (good derivable, bad not)."""

import json

import pytest

from kdcache.precompute import grammar
from kdcache.precompute.grammar import (
    ANIMATE, AUXILIARIES, CONTRACTED, INANIMATE, INTRANSITIVE, IRREGULAR, IRREGULAR_INANIMATE, NEEDS_OBJECT,
    NO_OBJECT, PHENOMENA, REFLEXIVES, TRANSITIVE, generate_corpus, generate_minimal_pairs,
    is_grammatical, words_of, write_minimal_pairs,
)

PAIRS = 200
IRREGULAR_NOUNS = {w for sg, pl, _ in IRREGULAR for w in (sg, pl)} | {w for pair in IRREGULAR_INANIMATE for w in pair}


@pytest.fixture(scope="module")
def pairs():
    return generate_minimal_pairs(PAIRS, seed=0)


def test_corpus_is_deterministic_for_a_seed():
    assert generate_corpus(500, 3) == generate_corpus(500, 3)
    assert generate_corpus(500, 3) != generate_corpus(500, 4)
    assert generate_corpus(10, 3) == generate_corpus(500, 3)[:10]


def test_pairs_are_deterministic_for_a_seed_and_apart_from_the_corpus():
    assert generate_minimal_pairs(5, 7) == generate_minimal_pairs(5, 7)
    assert generate_minimal_pairs(5, 7) != generate_minimal_pairs(5, 8)
    goods = [r["sentence_good"] for records in generate_minimal_pairs(5, 3).values() for r in records]
    assert goods[:5] != generate_corpus(5, 3)


def test_rules_are_well_formed_and_all_reachable():
    for options in grammar.RULES.values():
        for rhs, weight in options:
            assert rhs and weight > 0  # no empty rules: the recogniser relies on it
            for symbol in rhs:  # a capitalised symbol is a nonterminal and must have rules
                assert symbol in grammar.RULES or not symbol[0].isupper(), symbol
    reached, frontier = {grammar.START}, [grammar.START]
    while frontier:
        for rhs, _ in grammar.RULES[frontier.pop()]:
            for symbol in rhs:
                if symbol in grammar.RULES and symbol not in reached:
                    reached.add(symbol)
                    frontier.append(symbol)
    assert reached == set(grammar.RULES)


def test_no_noun_or_adjective_needs_an():
    words = [w for sg, pl, _ in ANIMATE + IRREGULAR for w in (sg, pl)]
    words += [w for pair in INANIMATE + IRREGULAR_INANIMATE for w in pair] + grammar.ADJECTIVES
    assert not [w for w in words + grammar.ANIMATE_ADJECTIVES if w[0] in "aeiou"]


def test_every_generated_sentence_is_recognised():
    corpus = generate_corpus(3000, 11)
    assert all(is_grammatical(s) for s in corpus)


@pytest.mark.parametrize("sentence", [
    "the dog near the cats is happy.", "the boys that the girl sees are running.", "look, the little dog is running.",
    "the dog doesn't run.", "the dogs don't run.", "the cat isn't happy.", "the children were hungry.",
    "the man has found the ball.", "do the mice like the cookies?",
    "the sheep runs.", "the sheep run.", "where are my shoes?", "the ball under the chairs is red.",
    "oh, the girl washes herself. is she happy?", "my feet are cold.",
])
def test_grammatical_sentences_are_accepted(sentence):
    assert is_grammatical(sentence)


@pytest.mark.parametrize("sentence", [
    "the dogs runs.", "a dog run.", "the boy finds.", "the girl sleeps the ball.", "the boys wash himself.",
    "does the dogs run?", "these ball is red.", "the dog near the cats run.", "dog the runs.", "the dogs doesn't run.",
    "the cat aren't happy.", "the children was hungry.", "the man have found the ball.", "the blanket is hungry.",
    "the boy builds the girl.", "this mice run.", "the dog runs", "the dog runs?", "", "the dog runs. the",
])
def test_ungrammatical_sentences_are_rejected(sentence):
    assert not is_grammatical(sentence)


def test_vocabulary_is_child_directed_english_with_irregulars():
    words = {w for s in generate_corpus(50000, 1) for w in words_of(s)}
    assert len(words) > 300
    assert {"children", "mice", "men", "people", "feet", "sheep", "themselves", "himself", "herself",
            "doesn't", "don't", "isn't", "was", "were", "has", "have", "not", "?"} <= words


def test_at_least_eight_phenomena_of_200_pairs(pairs):
    assert len(PHENOMENA) >= 8 and set(pairs) == set(PHENOMENA)
    for uid, records in pairs.items():
        assert len(records) == PAIRS
        assert [r["pairID"] for r in records] == [str(i) for i in range(PAIRS)]
        assert all(r["UID"] == uid and r["field"] in {"morphology", "syntax"} and r["linguistics_term"]
                   for r in records)
        assert len({r["sentence_good"] for r in records}) > PAIRS * 3 // 4  # varied, not one sentence repeated


# The word pairs a paradigm may swap, built from the lexicon here rather than from the generator's swap tables.
def _verb_numbers():
    return {frozenset(v[:2]) for v in INTRANSITIVE + TRANSITIVE}


def _aux_numbers():
    return {frozenset(forms) for forms in AUXILIARIES.values()} | \
        {frozenset(CONTRACTED[f] for f in forms) for forms in AUXILIARIES.values()}


def _transitivity():
    forms = {v[0]: v for v in INTRANSITIVE + TRANSITIVE}
    return {frozenset((forms[a][k], forms[b][k])) for a in NEEDS_OBJECT for b in NO_OBJECT for k in (0, 1)}


SWAPS = {
    "determiner_noun_agreement": lambda: {frozenset(("this", "these")), frozenset(("that", "those"))},
    "subject_verb_agreement": _verb_numbers,
    "subject_verb_agreement_pp_attractor": lambda: _verb_numbers() | _aux_numbers(),
    "subject_verb_agreement_relative_clause": lambda: _verb_numbers() | _aux_numbers(),
    "irregular_plural_subject_verb_agreement": lambda: _verb_numbers() | _aux_numbers(),
    "anaphor_number_agreement": lambda: {frozenset((r, "themselves")) for r in REFLEXIVES.values()} - {
        frozenset(["themselves"])},
    "argument_structure_transitive": _transitivity,
    "negation_auxiliary_agreement": _aux_numbers,
    "question_auxiliary_agreement": _aux_numbers,
}
SWAPS["determiner_noun_agreement_irregular"] = SWAPS["determiner_noun_agreement"]


@pytest.mark.parametrize("uid", PHENOMENA)
def test_pairs_differ_in_exactly_the_intended_feature(pairs, uid):
    allowed = SWAPS[uid]()
    for record in pairs[uid]:
        good, bad = words_of(record["sentence_good"]), words_of(record["sentence_bad"])
        assert is_grammatical(record["sentence_good"]), record
        assert not is_grammatical(record["sentence_bad"]), record
        diff = [i for i, (g, b) in enumerate(zip(good, bad)) if g != b]
        assert len(good) == len(bad) and len(diff) == 1
        assert frozenset((good[diff[0]], bad[diff[0]])) in allowed, record
        if "irregular" in uid:
            assert IRREGULAR_NOUNS & set(good)


def test_question_pairs_swap_the_fronted_auxiliary(pairs):
    for record in pairs["question_auxiliary_agreement"]:
        assert record["sentence_good"].endswith("?")
        assert words_of(record["sentence_good"])[0] != words_of(record["sentence_bad"])[0]


def test_argument_structure_pairs_go_both_ways(pairs):
    verbs = {v[k]: v[0] for v in INTRANSITIVE + TRANSITIVE for k in (0, 1)}
    good_verbs = {verbs[w] for r in pairs["argument_structure_transitive"] for w in words_of(r["sentence_good"])
                  if w in verbs}
    assert good_verbs & set(NEEDS_OBJECT) and good_verbs & set(NO_OBJECT)


SINGULAR_NOUNS = {sg for sg, pl, _ in ANIMATE + IRREGULAR if sg != pl}
PLURAL_NOUNS = {pl for sg, pl, _ in ANIMATE + IRREGULAR if sg != pl}
SINGULAR_VERBS = {v[1] for v in INTRANSITIVE + TRANSITIVE} | {sg for sg, _ in AUXILIARIES.values()}


@pytest.mark.parametrize("uid, marker", [("subject_verb_agreement_pp_attractor", set(grammar.PREPOSITIONS)),
                                         ("subject_verb_agreement_relative_clause", {"that"})])
def test_attractors_have_the_other_number(pairs, uid, marker):
    for record in pairs[uid]:
        good, bad = words_of(record["sentence_good"]), words_of(record["sentence_bad"])
        at = next(i for i, w in enumerate(good) if w in marker and i >= 2)
        attractor = good[at + 2]  # marker, determiner, noun
        verb = next(g for g, b in zip(good, bad) if g != b)
        assert attractor in (PLURAL_NOUNS if verb in SINGULAR_VERBS else SINGULAR_NOUNS), record


def test_pairs_are_written_as_blimp_jsonl(tmp_path):
    paths = write_minimal_pairs(tmp_path, 20, seed=1)
    assert sorted(p.name for p in paths) == sorted(f"{uid}.jsonl" for uid in PHENOMENA)
    for path in paths:
        lines = path.read_text().splitlines()
        assert len(lines) == 20
        records = [json.loads(line) for line in lines]
        assert all(set(r) == {"sentence_good", "sentence_bad", "UID", "field", "linguistics_term", "pairID"}
                   for r in records)
        assert {r["UID"] for r in records} == {path.stem}
    assert not list(tmp_path.glob("*.partial"))
