"""The demo grammar: deterministic, its recogniser accepts what it generates, and every minimal pair differs in
exactly the intended feature (good derivable, bad not)."""

import json

import pytest

from precompute import grammar
from precompute.grammar import (
    AUX_NUMBER, DEMONSTRATIVE, IRREGULAR_NOUNS, PHENOMENA, REFLEXIVE_NUMBER, TRANSITIVITY, VERB_NUMBER,
    generate_corpus, generate_minimal_pairs, is_grammatical, words_of, write_minimal_pairs,
)

PAIRS = 200


@pytest.fixture(scope="module")
def pairs():
    return generate_minimal_pairs(PAIRS, seed=0)


def test_corpus_is_deterministic_for_a_seed():
    assert generate_corpus(500, 3) == generate_corpus(500, 3)
    assert generate_corpus(500, 3) != generate_corpus(500, 4)


def test_the_grammar_has_no_empty_rules_and_every_symbol_is_defined():
    for options in grammar.RULES.values():
        for rhs, weight in options:
            assert rhs and weight > 0
            for symbol in rhs:  # a capitalised symbol is a nonterminal and must have rules
                assert symbol in grammar.RULES or not symbol[0].isupper(), symbol


def test_every_generated_sentence_is_recognised():
    corpus = generate_corpus(3000, 11)
    assert all(is_grammatical(s) for s in corpus)


@pytest.mark.parametrize("sentence", [
    "the dogs runs.", "a dog run.", "the boy sees.", "the girl sleeps the ball.", "the boys wash himself.",
    "does the dogs run?", "these ball is red.", "the dog near the cats run.", "dog the runs.", "",
])
def test_ungrammatical_sentences_are_rejected(sentence):
    assert not is_grammatical(sentence)


def test_vocabulary_is_child_directed_english_with_irregulars():
    words = {w for s in generate_corpus(50000, 1) for w in words_of(s)}
    assert len(words) > 300
    assert {"children", "mice", "men", "themselves", "himself", "not", "?"} <= words


def test_at_least_eight_phenomena_of_200_pairs(pairs):
    assert len(PHENOMENA) >= 8 and set(pairs) == set(PHENOMENA)
    for uid, records in pairs.items():
        assert len(records) == PAIRS
        assert [r["pairID"] for r in records] == [str(i) for i in range(PAIRS)]
        assert all(r["UID"] == uid and r["field"] and r["linguistics_term"] for r in records)


# The one word a paradigm swaps, and the table its counterpart comes from.
SWAPS = {
    "determiner_noun_agreement": DEMONSTRATIVE, "determiner_noun_agreement_irregular": DEMONSTRATIVE,
    "subject_verb_agreement": VERB_NUMBER, "subject_verb_agreement_pp_attractor": VERB_NUMBER,
    "irregular_plural_subject_verb_agreement": VERB_NUMBER, "subject_verb_agreement_relative_clause": AUX_NUMBER,
    "anaphor_number_agreement": REFLEXIVE_NUMBER, "argument_structure_transitive": TRANSITIVITY,
    "negation_auxiliary_agreement": AUX_NUMBER, "question_auxiliary_agreement": AUX_NUMBER,
}


@pytest.mark.parametrize("uid", PHENOMENA)
def test_pairs_differ_in_exactly_the_intended_feature(pairs, uid):
    for record in pairs[uid]:
        good, bad = words_of(record["sentence_good"]), words_of(record["sentence_bad"])
        assert is_grammatical(record["sentence_good"]) and not is_grammatical(record["sentence_bad"])
        diff = [i for i, (g, b) in enumerate(zip(good, bad)) if g != b]
        assert len(good) == len(bad) and len(diff) == 1
        g, b = good[diff[0]], bad[diff[0]]
        assert SWAPS[uid][g] == b
        if "irregular" in uid:
            assert IRREGULAR_NOUNS & set(good)


def test_attractors_have_the_other_number(pairs):
    for record in pairs["subject_verb_agreement_pp_attractor"]:
        words = words_of(record["sentence_good"])
        verb = words[-2]  # ... attractor noun, verb, "."
        attractor_is_plural = words[-3] not in {w for s, p, _ in grammar.ANIMATE + grammar.IRREGULAR for w in [s]}
        verb_is_plural = verb in {v[0] for v in grammar.INTRANSITIVE}
        assert attractor_is_plural != verb_is_plural


def test_pairs_are_written_as_blimp_jsonl(tmp_path):
    paths = write_minimal_pairs(tmp_path, 20, seed=1)
    assert sorted(p.stem for p in paths) == sorted(PHENOMENA)
    for path in paths:
        lines = path.read_text().splitlines()
        assert len(lines) == 20
        record = json.loads(lines[0])
        assert set(record) == {"sentence_good", "sentence_bad", "UID", "field", "linguistics_term", "pairID"}
    assert not list(tmp_path.glob("*.tmp-*"))
