"""The embedded demo corpus: a probabilistic English grammar of child-directed speech, and minimal pairs from it.

One source of truth: the lexicon below and the rule table `RULES` built from it, a context-free grammar whose
nonterminals carry agreement in their names (`Subj.sg.f`, `VP.pl`, `Cop.sg`). `generate_corpus` expands it at
random; `is_grammatical` is an Earley recogniser over the same table; the minimal pairs build a sentence of one
construction and swap one word for its counterpart in exactly one feature (number, transitivity), as BLiMP's
paradigms do, and the recogniser checks that the good one is derivable and the bad one is not.
"""

from __future__ import annotations

import json
import os
import random
from itertools import accumulate
from pathlib import Path
from typing import Callable
from kdcache.files import atomic_write

# ---------------------------------------------------------------------------------------------------------------
# Lexicon. No noun or adjective starts with a vowel, so "a" never has to become "an".

NUMBERS = ("sg", "pl")
# Agreement classes of a subject: number, and for singulars the gender a reflexive needs.
AGREEMENTS = ("sg.m", "sg.f", "sg.n", "pl")

# Animate nouns (singular, plural, genders): subjects of verbs. "mf" nouns take himself or herself.
ANIMATE = [
    ("dog", "dogs", "n"), ("cat", "cats", "n"), ("bird", "birds", "n"), ("bunny", "bunnies", "n"),
    ("duck", "ducks", "n"), ("horse", "horses", "n"), ("frog", "frogs", "n"), ("puppy", "puppies", "n"),
    ("kitten", "kittens", "n"), ("monkey", "monkeys", "n"), ("bear", "bears", "n"), ("lion", "lions", "n"),
    ("cow", "cows", "n"), ("pig", "pigs", "n"), ("turtle", "turtles", "n"), ("pony", "ponies", "n"),
    ("tiger", "tigers", "n"), ("zebra", "zebras", "n"), ("penguin", "penguins", "n"), ("chicken", "chickens", "n"),
    ("boy", "boys", "m"), ("girl", "girls", "f"), ("mommy", "mommies", "f"), ("daddy", "daddies", "m"),
    ("brother", "brothers", "m"), ("sister", "sisters", "f"), ("grandma", "grandmas", "f"),
    ("grandpa", "grandpas", "m"), ("king", "kings", "m"), ("queen", "queens", "f"),
    ("teacher", "teachers", "mf"), ("doctor", "doctors", "mf"), ("friend", "friends", "mf"),
    ("baby", "babies", "mf"), ("farmer", "farmers", "mf"),
]
# Irregular plurals, including the invariant ones (sheep, fish) whose number only the determiner or verb shows.
IRREGULAR = [
    ("man", "men", "m"), ("woman", "women", "f"), ("child", "children", "mf"), ("person", "people", "mf"),
    ("mouse", "mice", "n"), ("goose", "geese", "n"), ("wolf", "wolves", "n"), ("sheep", "sheep", "n"),
    ("fish", "fish", "n"),
]
INANIMATE = [
    ("ball", "balls"), ("cup", "cups"), ("book", "books"), ("toy", "toys"), ("block", "blocks"), ("car", "cars"),
    ("truck", "trucks"), ("cookie", "cookies"), ("banana", "bananas"), ("shoe", "shoes"), ("hat", "hats"),
    ("box", "boxes"), ("spoon", "spoons"), ("chair", "chairs"), ("blanket", "blankets"), ("house", "houses"),
    ("tree", "trees"), ("flower", "flowers"), ("sock", "socks"), ("bottle", "bottles"), ("puzzle", "puzzles"),
    ("crayon", "crayons"), ("bed", "beds"), ("door", "doors"), ("window", "windows"), ("table", "tables"),
    ("boat", "boats"), ("drum", "drums"), ("kite", "kites"), ("pillow", "pillows"), ("sandwich", "sandwiches"),
    ("button", "buttons"), ("balloon", "balloons"), ("train", "trains"), ("bus", "buses"), ("wagon", "wagons"),
    ("bowl", "bowls"), ("plate", "plates"),
]
IRREGULAR_INANIMATE = [("foot", "feet"), ("tooth", "teeth"), ("leaf", "leaves")]
# Adjectives for anything, and those that only make sense of a living thing ("the blanket is hungry" is out).
ADJECTIVES = ["big", "little", "red", "blue", "green", "yellow", "pink", "soft", "pretty", "dirty", "clean", "warm",
              "tiny", "wet", "cold", "hot", "shiny", "fluffy", "nice", "good", "funny", "silly", "new", "round"]
ANIMATE_ADJECTIVES = ["happy", "sad", "hungry", "sleepy", "tired", "busy", "quiet", "loud", "fast", "slow", "brave",
                      "grumpy", "scared", "kind"]

# Verbs: (base, third person singular, -ing, past participle).
INTRANSITIVE = [
    ("run", "runs", "running", "run"), ("sleep", "sleeps", "sleeping", "slept"), ("jump", "jumps", "jumping", "jumped"),
    ("cry", "cries", "crying", "cried"), ("laugh", "laughs", "laughing", "laughed"),
    ("swim", "swims", "swimming", "swum"), ("dance", "dances", "dancing", "danced"),
    ("smile", "smiles", "smiling", "smiled"), ("sit", "sits", "sitting", "sat"), ("fall", "falls", "falling", "fallen"),
    ("sneeze", "sneezes", "sneezing", "sneezed"), ("giggle", "giggles", "giggling", "giggled"),
    ("wait", "waits", "waiting", "waited"), ("sing", "sings", "singing", "sung"),
    ("yawn", "yawns", "yawning", "yawned"), ("nap", "naps", "napping", "napped"),
]
TRANSITIVE = [
    ("see", "sees", "seeing", "seen"), ("like", "likes", "liking", "liked"), ("want", "wants", "wanting", "wanted"),
    ("have", "has", "having", "had"), ("hold", "holds", "holding", "held"), ("push", "pushes", "pushing", "pushed"),
    ("find", "finds", "finding", "found"), ("kick", "kicks", "kicking", "kicked"), ("hug", "hugs", "hugging", "hugged"),
    ("wash", "washes", "washing", "washed"), ("love", "loves", "loving", "loved"),
    ("drop", "drops", "dropping", "dropped"), ("carry", "carries", "carrying", "carried"),
    ("catch", "catches", "catching", "caught"), ("touch", "touches", "touching", "touched"),
    ("watch", "watches", "watching", "watched"), ("chase", "chases", "chasing", "chased"),
    ("brush", "brushes", "brushing", "brushed"), ("tickle", "tickles", "tickling", "tickled"),
    ("help", "helps", "helping", "helped"), ("build", "builds", "building", "built"),
    ("eat", "eats", "eating", "eaten"), ("throw", "throws", "throwing", "thrown"), ("read", "reads", "reading", "read"),
    ("feed", "feeds", "feeding", "fed"),
]
# Object selection: these take things only ("builds some doctors" is out) ...
THING_VERBS = {"build", "drop", "eat", "throw", "read", "kick"}
# ... these take a living thing as well, so also a reflexive ("the boy washes himself").
REFLEXIVE_VERBS = {"see", "like", "hug", "wash", "love", "touch", "watch", "brush", "tickle", "help", "feed"}
# For the argument-structure pairs: verbs that plainly cannot take an object, and ones that cannot drop theirs.
NO_OBJECT = ("sleep", "cry", "laugh", "smile", "fall", "sneeze", "giggle", "yawn", "nap")
NEEDS_OBJECT = ("find", "want", "like", "love", "have", "hold", "carry", "touch", "tickle")

PREPOSITIONS = ["near", "behind", "with", "under", "beside", "on"]
DETERMINERS = {"sg": ["the", "a", "this", "that", "every", "my", "your"],
               "pl": ["the", "these", "those", "some", "my", "your", "two", "three"]}
DEMONSTRATIVE = {"this": "these", "that": "those", "these": "this", "those": "that"}
PRONOUNS = {"sg.m": "he", "sg.f": "she", "sg.n": "it", "pl": "they"}
REFLEXIVES = {"sg.m": "himself", "sg.f": "herself", "sg.n": "itself", "pl": "themselves"}
# Auxiliaries by number, and their contracted negations.
AUXILIARIES = {"Cop": ("is", "are"), "Was": ("was", "were"), "Have": ("has", "have"), "Do": ("does", "do")}
CONTRACTED = {"is": "isn't", "are": "aren't", "was": "wasn't", "were": "weren't", "has": "hasn't",
              "have": "haven't", "does": "doesn't", "do": "don't"}
INTERJECTIONS = ["look", "oh", "wow", "see", "hey", "yes"]
PUNCTUATION = (".", "?", ",")


def _number(agreement: str) -> str:
    return agreement.split(".")[0]


def _nouns_of(agreement: str, nouns: list[tuple[str, str, str]]) -> list[str]:
    """The forms of `nouns` that a subject of this agreement class can have."""
    if agreement == "pl":
        return [pl for _, pl, _ in nouns]
    return [sg for sg, _, genders in nouns if agreement[-1] in genders]


# ---------------------------------------------------------------------------------------------------------------
# The rule table: nonterminal -> [(right-hand side, weight)]. Nonterminals are capitalised; the rest are words.

Rules = dict[str, list[tuple[tuple[str, ...], float]]]
FORM_INDEX = {"sg": 1, "pl": 0, "base": 0, "ing": 2, "pp": 3}  # verb form -> index into a verb tuple


def _lexical_rules(add: Callable[..., None]) -> None:
    """Preterminals: one word each."""
    for agreement in AGREEMENTS:
        for noun in _nouns_of(agreement, ANIMATE + IRREGULAR):
            add(f"N.{agreement}", (noun,))
    for sg, pl in INANIMATE + IRREGULAR_INANIMATE:
        add("NI.sg", (sg,))
        add("NI.pl", (pl,))
    for adj in ADJECTIVES:
        add("Adj", (adj,))  # any noun
        add("AdjI", (adj,))  # also things
    for adj in ANIMATE_ADJECTIVES:
        add("Adj", (adj,))
    for words, symbol in ((PREPOSITIONS, "P"), (INTERJECTIONS, "Intj"), (DETERMINERS["sg"], "Det.sg"),
                          (DETERMINERS["pl"], "Det.pl")):
        for word in words:
            add(symbol, (word,))
    for form in FORM_INDEX:
        for verb in INTRANSITIVE:
            add(f"IV.{form}", (verb[FORM_INDEX[form]],))
        for verb in TRANSITIVE:
            word = verb[FORM_INDEX[form]]
            add(f"TT.{form}" if verb[0] in THING_VERBS else f"TV.{form}", (word,))
            if verb[0] in REFLEXIVE_VERBS:
                add(f"RV.{form}", (word,))
    for aux, forms in AUXILIARIES.items():
        for n, word in zip(NUMBERS, forms):
            add(f"{aux}.{n}", (word,))
            # Negated auxiliaries, in full or contracted: "does not", "doesn't".
            add(f"{aux}Not.{n}", (f"{aux}.{n}", "not"))
            add(f"{aux}Not.{n}", (CONTRACTED[word],))


def _noun_phrase_rules(add: Callable[..., None]) -> None:
    """Bare noun phrases (objects), and subjects that may carry an attractor (PP or relative clause)."""
    for agreement in AGREEMENTS:
        n = _number(agreement)
        add(f"NPA0.{agreement}", (f"Det.{n}", f"N.{agreement}"), 3)
        add(f"NPA0.{agreement}", (f"Det.{n}", "Adj", f"N.{agreement}"))
        add(f"NP0.{n}", (f"NPA0.{agreement}",))
        add(f"NPA.{agreement}", (f"NPA0.{agreement}",), 8)
        add(f"NPA.{agreement}", (f"NPA0.{agreement}", "P", "NP0"), 1.2)
        add(f"NPA.{agreement}", (f"NPA0.{agreement}", "that", f"VP.{agreement}"), 0.6)
        for other in AGREEMENTS:  # object relatives, on verbs that take a living object: "the dog that the cats see"
            add(f"NPA.{agreement}", (f"NPA0.{agreement}", "that", f"NPA0.{other}", f"TV.{_number(other)}"), 0.25)
        add(f"Subj.{agreement}", (f"NPA.{agreement}",), 4)
        add(f"Subj.{agreement}", (PRONOUNS[agreement],), 1)
    for n in NUMBERS:
        add(f"NPI0.{n}", (f"Det.{n}", f"NI.{n}"), 3)
        add(f"NPI0.{n}", (f"Det.{n}", "AdjI", f"NI.{n}"))
        add(f"NP0.{n}", (f"NPI0.{n}",), 2)
        add("NP0", (f"NP0.{n}",))
        add("ObjI", (f"NPI0.{n}",))
        add(f"NPI.{n}", (f"NPI0.{n}",), 4)
        add(f"NPI.{n}", (f"NPI0.{n}", "P", "NP0"), 1)
    add("Obj", ("NP0",))


def _verb_phrase_rules(add: Callable[..., None]) -> None:
    """Verb groups in each form; the finite one, or the first auxiliary, agrees with the subject."""
    for agreement in AGREEMENTS:
        n = _number(agreement)
        for form in ("fin", "base", "ing", "pp"):
            verb_form = n if form == "fin" else form
            group = f"V.{form}.{agreement}"
            add(group, (f"IV.{verb_form}",), 3)
            add(group, (f"TV.{verb_form}", "Obj"), 3)
            add(group, (f"TT.{verb_form}", "ObjI"), 1.5)
            add(group, (f"RV.{verb_form}", REFLEXIVES[agreement]), 1)
        vp, neg = f"VP.{agreement}", f"NegVP.{agreement}"
        add(vp, (f"V.fin.{agreement}",), 5)
        add(vp, (f"Cop.{n}", "Adj"), 1.5)
        add(vp, (f"Cop.{n}", f"V.ing.{agreement}"), 1.5)
        add(vp, (f"Was.{n}", "Adj"), 0.5)
        add(vp, (f"Was.{n}", f"V.ing.{agreement}"), 0.5)
        add(vp, (f"Have.{n}", f"V.pp.{agreement}"), 0.7)
        add(neg, (f"DoNot.{n}", f"V.base.{agreement}"), 2)
        add(neg, (f"CopNot.{n}", "Adj"), 1)
        add(neg, (f"CopNot.{n}", f"V.ing.{agreement}"), 0.5)
        add(neg, (f"WasNot.{n}", "Adj"), 0.3)
        add(neg, (f"HaveNot.{n}", f"V.pp.{agreement}"), 0.3)


def _clause_rules(add: Callable[..., None]) -> None:
    """Statements, yes/no and where-questions, and utterances of one or two sentences."""
    for agreement in AGREEMENTS:
        n = _number(agreement)
        subj = f"Subj.{agreement}"
        add("Stmt", (subj, f"VP.{agreement}"), 4)
        add("Stmt", (subj, f"NegVP.{agreement}"), 0.7)
        add("Ques", (f"Do.{n}", subj, f"V.base.{agreement}"), 0.6)
        add("Ques", (f"Cop.{n}", subj, "Adj"), 0.4)
        add("Ques", (f"Cop.{n}", subj, f"V.ing.{agreement}"), 0.3)
        add("Ques", (f"Was.{n}", subj, "Adj"), 0.1)
        add("Ques", (f"Have.{n}", subj, f"V.pp.{agreement}"), 0.1)
    for n in NUMBERS:  # things: "the ball under the chair is red", "where are my shoes?"
        add("Stmt", (f"NPI.{n}", f"Cop.{n}", "AdjI"), 0.8)
        add("Stmt", (f"NPI.{n}", f"Was.{n}", "AdjI"), 0.2)
        add("Stmt", (f"NPI.{n}", f"CopNot.{n}", "AdjI"), 0.2)
        add("Ques", (f"Cop.{n}", f"NPI.{n}", "AdjI"), 0.3)
        add("Ques", ("where", f"Cop.{n}", f"NP0.{n}"), 0.3)
    add("Stmt", ("look", "at", "NP0"), 0.5)
    add("S", ("Stmt", "."), 8)
    add("S", ("Ques", "?"), 2)
    add("First", ("S",), 9)
    add("First", ("Intj", ",", "S"), 1)
    add("Utt", ("First",), 10)
    add("Utt", ("First", "S"), 1)


def _build_rules() -> Rules:
    rules: Rules = {}

    def add(lhs: str, rhs: tuple[str, ...], weight: float = 1.0) -> None:
        rules.setdefault(lhs, []).append((rhs, weight))

    for part in (_lexical_rules, _noun_phrase_rules, _verb_phrase_rules, _clause_rules):
        part(add)
    return rules


RULES = _build_rules()
START = "Utt"
# For sampling: each nonterminal's right-hand sides and their cumulative weights.
_CHOICES = {lhs: ([rhs for rhs, _ in options], list(accumulate(w for _, w in options)))
            for lhs, options in RULES.items()}
# Preterminals (every right-hand side one word): the recogniser scans them by a word -> categories lookup.
_PRETERMINALS = {lhs for lhs, options in RULES.items()
                 if all(len(rhs) == 1 and rhs[0] not in RULES for rhs, _ in options)}
_CATEGORIES: dict[str, set[str]] = {}
for _lhs in _PRETERMINALS:
    for (_word,), _ in RULES[_lhs]:
        _CATEGORIES.setdefault(_word, set()).add(_lhs)


# ---------------------------------------------------------------------------------------------------------------
# Generation.


def _expand(symbol: str, rng: random.Random, out: list[str]) -> None:
    if symbol not in _CHOICES:
        out.append(symbol)
        return
    options, cum_weights = _CHOICES[symbol]
    for part in rng.choices(options, cum_weights=cum_weights)[0]:
        _expand(part, rng, out)


def render(words: list[str]) -> str:
    """Words joined by spaces, punctuation attached to the word before it: "look, the dog is big."."""
    return " ".join(words).replace(" .", ".").replace(" ?", "?").replace(" ,", ",")


def words_of(sentence: str) -> list[str]:
    """The inverse of `render`: punctuation marks become words of their own."""
    for mark in PUNCTUATION:
        sentence = sentence.replace(mark, f" {mark}")
    return sentence.split()


def generate_corpus(num_sentences: int, seed: int) -> list[str]:
    """Deterministic for a seed: one utterance (one or two sentences) a line."""
    rng = random.Random(f"corpus-{seed}")
    lines = []
    for _ in range(num_sentences):
        words: list[str] = []
        _expand(START, rng, words)
        lines.append(render(words))
    return lines


# ---------------------------------------------------------------------------------------------------------------
# Recognition: Earley over RULES (which has no empty rules, so a completed item always spans at least one word).

Item = tuple[str, tuple[str, ...], int, int]  # lhs, rhs, dot, origin


def is_grammatical(sentence: str, start: str = START) -> bool:
    """True when the grammar derives this sentence."""
    words = words_of(sentence)
    chart: list[set[Item]] = [set() for _ in range(len(words) + 1)]
    waiting: list[dict[str, list[Item]]] = [{} for _ in range(len(words) + 1)]  # symbol -> items expecting it
    chart[0] = {(start, rhs, 0, 0) for rhs in _CHOICES[start][0]}
    for i, column in enumerate(chart):
        agenda = list(column)
        while agenda:
            lhs, rhs, dot, origin = item = agenda.pop()
            if dot == len(rhs):  # complete: advance what was waiting for lhs where it began
                new = [(l2, r2, d2 + 1, o2) for l2, r2, d2, o2 in waiting[origin].get(lhs, ())]
            elif rhs[dot] in _PRETERMINALS or rhs[dot] not in RULES:  # scan
                if i < len(words) and (words[i] == rhs[dot] or rhs[dot] in _CATEGORIES.get(words[i], ())):
                    chart[i + 1].add((lhs, rhs, dot + 1, origin))
                continue
            else:  # predict, once per symbol and position
                nxt = rhs[dot]
                new = [] if nxt in waiting[i] else [(nxt, r, 0, i) for r in _CHOICES[nxt][0]]
                waiting[i].setdefault(nxt, []).append(item)
            for candidate in new:
                if candidate not in column:
                    column.add(candidate)
                    agenda.append(candidate)
    return any(lhs == start and dot == len(rhs) and origin == 0 for lhs, rhs, dot, origin in chart[-1])


# ---------------------------------------------------------------------------------------------------------------
# Minimal pairs: a good sentence of one construction, and the same sentence with one word's feature flipped.
# Each builder returns (words, index of the word to swap, table giving that word's counterpart).

VERB_NUMBER = {v[1]: v[0] for v in INTRANSITIVE + TRANSITIVE} | {v[0]: v[1] for v in INTRANSITIVE + TRANSITIVE}
AUX_NUMBER = {sg: pl for sg, pl in AUXILIARIES.values()} | {pl: sg for sg, pl in AUXILIARIES.values()}
AUX_NUMBER |= {CONTRACTED[a]: CONTRACTED[b] for a, b in list(AUX_NUMBER.items())}
AGREEMENT_NUMBER = VERB_NUMBER | AUX_NUMBER  # the verb or auxiliary that agrees with a subject
REFLEXIVE_NUMBER = {"himself": "themselves", "herself": "themselves", "itself": "themselves", "themselves": "himself"}
_LEMMA = {v[0]: v for v in INTRANSITIVE + TRANSITIVE}
# Same number, other transitivity: "the boy sleeps the ball", "the boy finds".
TRANSITIVITY = {
    _LEMMA[a][k]: _LEMMA[b][k]
    for own, other in ((NEEDS_OBJECT, NO_OBJECT), (NO_OBJECT, NEEDS_OBJECT))
    for i, a in enumerate(own) for b in [other[i % len(other)]] for k in (0, 1)
}
Built = tuple[list[str], int, dict[str, str]]


def _agreement(rng: random.Random) -> str:
    return rng.choice(AGREEMENTS)


def _of_number(rng: random.Random, n: str) -> str:
    """A random agreement class of number n."""
    return "pl" if n == "pl" else rng.choice(AGREEMENTS[:3])


def _other_number(rng: random.Random, agreement: str) -> str:
    """An agreement class of the other number: an attractor's."""
    return _of_number(rng, "pl" if _number(agreement) == "sg" else "sg")


def _np(rng: random.Random, agreement: str, nouns: list[tuple[str, str, str]] = ANIMATE + IRREGULAR,
        det: str | None = None) -> list[str]:
    return [det or rng.choice(DETERMINERS[_number(agreement)]), rng.choice(_nouns_of(agreement, nouns))]


def _thing(rng: random.Random, n: str | None = None, det: str | None = None,
           nouns: list[tuple[str, str]] = INANIMATE) -> list[str]:
    n = n or rng.choice(NUMBERS)
    return [det or rng.choice(DETERMINERS[n]), rng.choice(nouns)[0 if n == "sg" else 1]]


def _object(rng: random.Random) -> list[str]:
    return _thing(rng) if rng.random() < 0.6 else _np(rng, _agreement(rng))


def _predicate(rng: random.Random, agreement: str, auxiliaries: bool = True) -> list[str]:
    """A finite predicate whose first word agrees: a present-tense verb, or is/are, was/were, has/have."""
    n = _number(agreement)
    verb = rng.choice(INTRANSITIVE + TRANSITIVE)
    if auxiliaries and rng.random() < 0.5:
        aux = rng.choice(("Cop", "Was", "Have"))  # "does" + base form is emphatic; negation and questions have it
        word = AUXILIARIES[aux][NUMBERS.index(n)]
        if aux != "Have" and rng.random() < 0.5:
            return [word, rng.choice(ADJECTIVES + ANIMATE_ADJECTIVES)]
        head = [word, verb[FORM_INDEX["pp" if aux == "Have" else "ing"]]]
    else:
        head = [verb[FORM_INDEX[n]]]
    if verb in INTRANSITIVE:
        return head
    return head + (_thing(rng) if verb[0] in THING_VERBS else _object(rng))


def _det_noun(rng: random.Random, irregular: bool) -> Built:
    """"the boy sees these balls" / *"the boy sees this balls": the object's demonstrative."""
    subject = _agreement(rng)
    n = rng.choice(NUMBERS)
    det = rng.choice([d for d in DETERMINERS[n] if d in DEMONSTRATIVE])
    if irregular:
        verb = rng.choice([v for v in TRANSITIVE if v[0] not in THING_VERBS])
        obj = _np(rng, _of_number(rng, n), IRREGULAR, det) if rng.random() < 0.6 \
            else _thing(rng, n, det, IRREGULAR_INANIMATE)
    else:
        verb = rng.choice(TRANSITIVE)
        obj = _thing(rng, n, det)
    words = _np(rng, subject, det=rng.choice(["the", "my", "your"])) + [verb[FORM_INDEX[_number(subject)]]]
    return words + obj, len(words), DEMONSTRATIVE


def _sv_simple(rng: random.Random) -> Built:
    """"the dogs run" / *"the dogs runs": a regular noun and a present-tense verb."""
    agreement = _agreement(rng)
    words = _np(rng, agreement, ANIMATE)
    return words + _predicate(rng, agreement, auxiliaries=False), len(words), VERB_NUMBER


def _sv_irregular(rng: random.Random) -> Built:
    """"the children are happy" / *"the children is happy"."""
    agreement = _agreement(rng)
    words = _np(rng, agreement, IRREGULAR)
    return words + _predicate(rng, agreement), len(words), AGREEMENT_NUMBER


def _sv_pp(rng: random.Random) -> Built:
    """"the dog near the cats is happy": the attractor has the other number."""
    agreement = _agreement(rng)
    words = _np(rng, agreement) + [rng.choice(PREPOSITIONS)] + _np(rng, _other_number(rng, agreement), ANIMATE)
    return words + _predicate(rng, agreement), len(words), AGREEMENT_NUMBER


def _sv_relative(rng: random.Random) -> Built:
    """"the boys that the girl sees are running": the relative clause's subject has the other number."""
    agreement = _agreement(rng)
    inner = _other_number(rng, agreement)
    verb = rng.choice([v for v in TRANSITIVE if v[0] not in THING_VERBS])
    words = _np(rng, agreement) + ["that"] + _np(rng, inner, ANIMATE) + [verb[FORM_INDEX[_number(inner)]]]
    return words + _predicate(rng, agreement), len(words), AGREEMENT_NUMBER


def _anaphor(rng: random.Random) -> Built:
    """"the girls wash themselves" / *"the girls wash herself"."""
    agreement = _agreement(rng)
    verb = rng.choice([v for v in TRANSITIVE if v[0] in REFLEXIVE_VERBS])
    words = _np(rng, agreement) + [verb[FORM_INDEX[_number(agreement)]]]
    return words + [REFLEXIVES[agreement]], len(words), REFLEXIVE_NUMBER


def _transitive(rng: random.Random) -> Built:
    """*"the boy sleeps the ball" (an intransitive verb with an object) or *"the boy finds" (a transitive without)."""
    agreement = _agreement(rng)
    words = _np(rng, agreement)
    with_object = rng.random() < 0.5
    verb = _LEMMA[rng.choice(NEEDS_OBJECT if with_object else NO_OBJECT)][FORM_INDEX[_number(agreement)]]
    return words + [verb] + (_object(rng) if with_object else []), len(words), TRANSITIVITY


def _negation(rng: random.Random) -> Built:
    """"the dog doesn't run" / *"the dog don't run", and is not / isn't, was not / wasn't, has not / hasn't."""
    agreement = _agreement(rng)
    words = _np(rng, agreement)
    aux = rng.choice(list(AUXILIARIES))
    word = AUXILIARIES[aux][NUMBERS.index(_number(agreement))]
    negated = [CONTRACTED[word]] if rng.random() < 0.5 else [word, "not"]
    verb = rng.choice(INTRANSITIVE)
    rest = {"Do": [verb[0]], "Have": [verb[3]], "Cop": [rng.choice([verb[2], rng.choice(ANIMATE_ADJECTIVES)])],
            "Was": [rng.choice(ADJECTIVES)]}[aux]
    return words + negated + rest, len(words), AUX_NUMBER


def _question(rng: random.Random) -> Built:
    """"does the dog run?" / *"do the dog run?": the fronted auxiliary."""
    agreement = _agreement(rng)
    aux = rng.choice(["Do", "Do", "Cop", "Was", "Have"])
    verb = rng.choice(INTRANSITIVE)
    rest = {"Do": [verb[0]], "Cop": [rng.choice([verb[2], rng.choice(ANIMATE_ADJECTIVES)])],
            "Was": [rng.choice(ADJECTIVES)], "Have": [verb[3]]}[aux]
    return [AUXILIARIES[aux][NUMBERS.index(_number(agreement))]] + _np(rng, agreement) + rest, 0, AUX_NUMBER


# UID -> (builder, field, linguistics_term, final punctuation)
PARADIGMS: dict[str, tuple[Callable[[random.Random], Built], str, str, str]] = {
    "determiner_noun_agreement": (lambda rng: _det_noun(rng, False), "morphology", "determiner_noun_agreement", "."),
    "determiner_noun_agreement_irregular": (lambda rng: _det_noun(rng, True), "morphology",
                                            "determiner_noun_agreement", "."),
    "subject_verb_agreement": (_sv_simple, "morphology", "subject_verb_agreement", "."),
    "subject_verb_agreement_pp_attractor": (_sv_pp, "morphology", "subject_verb_agreement", "."),
    "subject_verb_agreement_relative_clause": (_sv_relative, "morphology", "subject_verb_agreement", "."),
    "irregular_plural_subject_verb_agreement": (_sv_irregular, "morphology", "subject_verb_agreement", "."),
    "anaphor_number_agreement": (_anaphor, "morphology", "anaphor_agreement", "."),
    "argument_structure_transitive": (_transitive, "syntax", "argument_structure", "."),
    "negation_auxiliary_agreement": (_negation, "syntax", "subject_verb_agreement", "."),
    "question_auxiliary_agreement": (_question, "syntax", "subject_verb_agreement", "?"),
}
PHENOMENA: tuple[str, ...] = tuple(PARADIGMS)


def make_pair(uid: str, rng: random.Random) -> tuple[str, str]:
    """One (good, bad) pair: the bad sentence swaps the word at the paradigm's position for its counterpart."""
    build, _, _, mark = PARADIGMS[uid]
    while True:
        words, at, swap = build(rng)
        bad = list(words)
        bad[at] = swap[words[at]]
        good_text, bad_text = render(words + [mark]), render(bad + [mark])
        # The grammar has the last word: a swap that stays grammatical ("the sheep run") is drawn again.
        if is_grammatical(good_text) and not is_grammatical(bad_text):
            return good_text, bad_text


def generate_minimal_pairs(pairs_per_phenomenon: int, seed: int) -> dict[str, list[dict]]:
    """UID -> BLiMP-format records (sentence_good, sentence_bad, UID, field, linguistics_term, pairID)."""
    out = {}
    for uid, (_, field, term, _) in PARADIGMS.items():
        rng = random.Random(f"pairs-{seed}-{uid}")  # a stream of its own, apart from the corpus's
        out[uid] = [
            {"sentence_good": good, "sentence_bad": bad, "UID": uid, "field": field, "linguistics_term": term,
             "pairID": str(i)}
            for i, (good, bad) in enumerate(make_pair(uid, rng) for _ in range(pairs_per_phenomenon))
        ]
    return out


def write_minimal_pairs(out_dir: str | os.PathLike, pairs_per_phenomenon: int, seed: int) -> list[Path]:
    """One <UID>.jsonl per phenomenon, each written to a temporary name then renamed."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for uid, records in generate_minimal_pairs(pairs_per_phenomenon, seed).items():
        path = out_dir / f"{uid}.jsonl"
        atomic_write(path, "".join(json.dumps(r) + "\n" for r in records))
        paths.append(path)
    return paths
