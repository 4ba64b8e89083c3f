"""The embedded demo corpus: a probabilistic English grammar of child-directed speech, and minimal pairs from it.

One source of truth: the lexicon and the rule table `RULES` (a context-free grammar whose nonterminals carry
number and gender in their names, e.g. `NP.pl.n`). `generate_corpus` expands it at random; `is_grammatical`
is an Earley recogniser over the same table; the minimal pairs take a generated good sentence and swap one
word for its counterpart in exactly one feature (number, transitivity), as BLiMP's paradigms do.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

NUMBERS = ("sg", "pl")
GENDERS = ("m", "f", "n")

# Nouns: (singular, plural, gender). Animate nouns can be subjects of verbs; irregular plurals are marked.
ANIMATE = [
    ("dog", "dogs", "n"), ("cat", "cats", "n"), ("bird", "birds", "n"), ("bunny", "bunnies", "n"),
    ("duck", "ducks", "n"), ("horse", "horses", "n"), ("frog", "frogs", "n"), ("puppy", "puppies", "n"),
    ("kitten", "kittens", "n"), ("monkey", "monkeys", "n"), ("bear", "bears", "n"), ("lion", "lions", "n"),
    ("boy", "boys", "m"), ("girl", "girls", "f"), ("mommy", "mommies", "f"), ("daddy", "daddies", "m"),
    ("brother", "brothers", "m"), ("sister", "sisters", "f"), ("grandma", "grandmas", "f"),
    ("grandpa", "grandpas", "m"), ("teacher", "teachers", "f"), ("doctor", "doctors", "m"),
    ("cow", "cows", "n"), ("pig", "pigs", "n"), ("friend", "friends", "m"), ("baby", "babies", "f"),
    ("king", "kings", "m"), ("queen", "queens", "f"), ("turtle", "turtles", "n"), ("puppet", "puppets", "n"),
]
IRREGULAR = [
    ("man", "men", "m"), ("woman", "women", "f"), ("child", "children", "m"), ("mouse", "mice", "n"),
    ("person", "people", "m"), ("goose", "geese", "n"),
]
INANIMATE = [
    ("ball", "balls"), ("cup", "cups"), ("book", "books"), ("toy", "toys"), ("block", "blocks"), ("car", "cars"),
    ("truck", "trucks"), ("cookie", "cookies"), ("banana", "bananas"), ("shoe", "shoes"), ("hat", "hats"),
    ("box", "boxes"), ("spoon", "spoons"), ("chair", "chairs"), ("blanket", "blankets"), ("house", "houses"),
    ("tree", "trees"), ("flower", "flowers"), ("sock", "socks"), ("bottle", "bottles"), ("puzzle", "puzzles"),
    ("crayon", "crayons"), ("foot", "feet"), ("tooth", "teeth"), ("bed", "beds"), ("door", "doors"),
    ("window", "windows"), ("table", "tables"), ("boat", "boats"), ("drum", "drums"), ("kite", "kites"),
    ("pillow", "pillows"), ("sandwich", "sandwiches"), ("button", "buttons"),
]
ADJECTIVES = ["big", "little", "happy", "sad", "red", "blue", "green", "yellow", "soft", "funny", "hungry",
              "sleepy", "nice", "pretty", "dirty", "clean", "warm", "silly", "tiny", "good", "wet", "cold", "hot",
              "tired", "busy", "quiet", "loud", "fast", "slow", "brave", "shiny", "fluffy"]
# Verbs: (base, third person singular, -ing).
INTRANSITIVE = [("run", "runs", "running"), ("sleep", "sleeps", "sleeping"), ("jump", "jumps", "jumping"),
                ("cry", "cries", "crying"), ("laugh", "laughs", "laughing"), ("swim", "swims", "swimming"),
                ("dance", "dances", "dancing"), ("smile", "smiles", "smiling"), ("sit", "sits", "sitting"),
                ("fall", "falls", "falling"), ("sneeze", "sneezes", "sneezing"), ("giggle", "giggles", "giggling"),
                ("wait", "waits", "waiting"), ("hide", "hides", "hiding")]
TRANSITIVE = [("see", "sees", "seeing"), ("like", "likes", "liking"), ("want", "wants", "wanting"),
              ("have", "has", "having"), ("hold", "holds", "holding"), ("push", "pushes", "pushing"),
              ("find", "finds", "finding"), ("kick", "kicks", "kicking"), ("hug", "hugs", "hugging"),
              ("wash", "washes", "washing"), ("love", "loves", "loving"), ("drop", "drops", "dropping"),
              ("carry", "carries", "carrying"), ("catch", "catches", "catching"), ("touch", "touches", "touching"),
              ("watch", "watches", "watching"), ("chase", "chases", "chasing"), ("brush", "brushes", "brushing"),
              ("tickle", "tickles", "tickling"), ("help", "helps", "helping"), ("build", "builds", "building")]
# Transitive verbs that take an animate object, so also a reflexive one ("the boy washes himself").
REFLEXIVE_VERBS = {"see", "like", "hug", "wash", "love", "touch", "watch", "brush", "chase", "tickle", "help"}
PREPOSITIONS = ["near", "behind", "with", "under", "beside"]
DETERMINERS = {"sg": ["the", "a", "this", "that", "every", "my", "your"],
               "pl": ["the", "these", "those", "some", "my", "your", "two"]}
DEMONSTRATIVE = {"this": "these", "that": "those", "these": "this", "those": "that"}
PRONOUNS = {("sg", "m"): "he", ("sg", "f"): "she", ("sg", "n"): "it"}
REFLEXIVES = {("sg", "m"): "himself", ("sg", "f"): "herself", ("sg", "n"): "itself"}
COPULA = {"sg": "is", "pl": "are"}
DO = {"sg": "does", "pl": "do"}
INTERJECTIONS = ["look", "oh", "wow", "see", "hey"]
PUNCTUATION = (".", "?", ",")


def _num_gen():
    """(number, gender) combinations: plurals are gender-neutral (themselves)."""
    return [("sg", g) for g in GENDERS] + [("pl", "n")]


def _build_rules() -> dict[str, list[tuple[tuple[str, ...], float]]]:
    """The grammar: nonterminal -> [(right-hand side, weight)]. Terminals are lower-case words or punctuation."""
    rules: dict[str, list[tuple[tuple[str, ...], float]]] = {}

    def add(lhs: str, rhs: tuple[str, ...], weight: float = 1.0) -> None:
        rules.setdefault(lhs, []).append((rhs, weight))

    for sg, pl, g in ANIMATE + IRREGULAR:
        add(f"N.sg.{g}", (sg,))
        add("N.pl.n", (pl,))
    for sg, pl in INANIMATE:
        add("NI.sg", (sg,))
        add("NI.pl", (pl,))
    for adj in ADJECTIVES:
        add("Adj", (adj,))
    for p in PREPOSITIONS:
        add("P", (p,))
    for n in NUMBERS:
        for det in DETERMINERS[n]:
            add(f"Det.{n}", (det,))
        form = 1 if n == "sg" else 0
        for verb in INTRANSITIVE:
            add(f"IV.{n}", (verb[form],))
            add("IV.base", (verb[0],))
            add("IV.ing", (verb[2],))
        for verb in TRANSITIVE:
            add(f"TV.{n}", (verb[form],))
            add("TV.base", (verb[0],))
            add("TV.ing", (verb[2],))
            if verb[0] in REFLEXIVE_VERBS:
                add(f"RV.{n}", (verb[form],))
                add("RV.base", (verb[0],))
        add(f"Cop.{n}", (COPULA[n],))
        add(f"Do.{n}", (DO[n],))
        # Inanimate noun phrases: objects, and subjects of "is red".
        add(f"NPI.{n}", (f"Det.{n}", f"NI.{n}"), 3)
        add(f"NPI.{n}", (f"Det.{n}", "Adj", f"NI.{n}"))
        add("NPsimple", (f"NPI.{n}",))
        add(f"Decl.{n}", (f"NPI.{n}", f"Cop.{n}", "Adj"), 0.5)

    for n, g in _num_gen():
        ng = f"{n}.{g}"
        # Animate noun phrases; modified subjects put an attractor (PP or relative clause) before the verb.
        add(f"NPA0.{ng}", (f"Det.{n}", f"N.{ng}"), 3)
        add(f"NPA0.{ng}", (f"Det.{n}", "Adj", f"N.{ng}"))
        add("NPsimple", (f"NPA0.{ng}",))
        add(f"NPA.{ng}", (f"NPA0.{ng}",), 6)
        add(f"NPA.{ng}", (f"NPA0.{ng}", "P", "NPsimple"), 1)
        add(f"NPA.{ng}", (f"NPA0.{ng}", "that", f"VP.{ng}"), 0.5)
        for m, h in _num_gen():
            add(f"NPA.{ng}", (f"NPA0.{ng}", "that", f"NPA0.{m}.{h}", f"TV.{m}"), 0.25)
        add(f"Subj.{ng}", (f"NPA.{ng}",), 4)
        add(f"Subj.{ng}", (PRONOUNS[(n, g)] if n == "sg" else "they",))
        refl = REFLEXIVES[(n, g)] if n == "sg" else "themselves"
        # Verb phrases agree with the subject in number (and, through the reflexive, gender).
        add(f"VP.{ng}", (f"IV.{n}",), 3)
        add(f"VP.{ng}", (f"TV.{n}", "Obj"), 3)
        add(f"VP.{ng}", (f"RV.{n}", refl), 1)
        add(f"VP.{ng}", (f"Cop.{n}", "Adj"), 1)
        add(f"VP.{ng}", (f"Cop.{n}", "IV.ing"), 1)
        add(f"VP.{ng}", (f"Cop.{n}", "TV.ing", "Obj"), 0.5)
        add(f"Decl.{n}", (f"Subj.{ng}", f"VP.{ng}"), 4)
        # Negation and yes/no questions: the auxiliary carries the agreement.
        add(f"Neg.{ng}", (f"Subj.{ng}", f"Do.{n}", "not", "VPbase"), 1)
        add(f"Neg.{ng}", (f"Subj.{ng}", f"Cop.{n}", "not", "Adj"), 1)
        add(f"Q.{ng}", (f"Do.{n}", f"Subj.{ng}", "VPbase"), 1)
        add(f"Q.{ng}", (f"Cop.{n}", f"Subj.{ng}", "Adj"), 1)
        add("Stmt", (f"Neg.{ng}",), 0.5)
        add("Ques", (f"Q.{ng}",), 0.5)
    add("Obj", ("NPsimple",))
    add("VPbase", ("IV.base",), 1)
    add("VPbase", ("TV.base", "Obj"), 1)
    for n in NUMBERS:
        add("Stmt", (f"Decl.{n}",), 2)
    add("S", ("Stmt", "."), 8)
    add("S", ("Ques", "?"), 2)
    for word in INTERJECTIONS:
        add("Intj", (word,))
    add("Utt", ("S",), 9)
    add("Utt", ("Intj", ",", "S"), 1)
    return rules


RULES = _build_rules()
START = "Utt"


def _expand(symbol: str, rng: random.Random) -> list[str]:
    if symbol not in RULES:
        return [symbol]
    options = RULES[symbol]
    rhs = rng.choices([r for r, _ in options], weights=[w for _, w in options])[0]
    return [word for part in rhs for word in _expand(part, rng)]


def render(words: list[str]) -> str:
    """Words joined by spaces, punctuation attached to the word before it."""
    text = ""
    for word in words:
        text += word if word in PUNCTUATION or not text else " " + word
    return text


def words_of(sentence: str) -> list[str]:
    for mark in PUNCTUATION:
        sentence = sentence.replace(mark, f" {mark}")
    return sentence.split()


def generate(symbol: str, rng: random.Random) -> str:
    return render(_expand(symbol, rng))


def generate_corpus(num_sentences: int, seed: int) -> list[str]:
    """Deterministic for a seed: one utterance a line."""
    rng = random.Random(f"corpus-{seed}")
    return [generate(START, rng) for _ in range(num_sentences)]


# ---------------------------------------------------------------------------------------------------------------
# Recognition: an Earley recogniser over RULES.


def is_grammatical(sentence: str, start: str = START) -> bool:
    """True when the grammar derives this sentence (Earley recognition; the grammar has no empty rules)."""
    words = words_of(sentence)
    # An item is (lhs, rhs, dot, origin).
    chart: list[set[tuple[str, tuple[str, ...], int, int]]] = [set() for _ in range(len(words) + 1)]
    chart[0] = {(start, rhs, 0, 0) for rhs, _ in RULES[start]}
    for i in range(len(words) + 1):
        agenda = list(chart[i])
        while agenda:
            lhs, rhs, dot, origin = agenda.pop()
            if dot < len(rhs):
                nxt = rhs[dot]
                if nxt in RULES:  # predict
                    for r, _ in RULES[nxt]:
                        item = (nxt, r, 0, i)
                        if item not in chart[i]:
                            chart[i].add(item)
                            agenda.append(item)
                elif i < len(words) and words[i] == nxt:  # scan
                    chart[i + 1].add((lhs, rhs, dot + 1, origin))
            else:  # complete
                for l2, r2, d2, o2 in list(chart[origin]):
                    if d2 < len(r2) and r2[d2] == lhs:
                        item = (l2, r2, d2 + 1, o2)
                        if item not in chart[i]:
                            chart[i].add(item)
                            agenda.append(item)
    return any(lhs == start and dot == len(rhs) and origin == 0 for lhs, rhs, dot, origin in chart[len(words)])


# ---------------------------------------------------------------------------------------------------------------
# Minimal pairs: a good sentence from one construction, and the same sentence with one feature flipped.

VERB_NUMBER = {v[1]: v[0] for v in INTRANSITIVE + TRANSITIVE} | {v[0]: v[1] for v in INTRANSITIVE + TRANSITIVE}
AUX_NUMBER = {"is": "are", "are": "is", "does": "do", "do": "does"}
REFLEXIVE_NUMBER = {"himself": "themselves", "herself": "themselves", "itself": "themselves", "themselves": "himself"}
TRANSITIVITY = {v[1]: INTRANSITIVE[i % len(INTRANSITIVE)][1] for i, v in enumerate(TRANSITIVE)}
IRREGULAR_NOUNS = {w for sg, pl, _ in IRREGULAR for w in (sg, pl)}


def _np(rng: random.Random, n: str, g: str, det: str | None = None, irregular: bool | None = None) -> list[str]:
    pool = IRREGULAR if irregular else ANIMATE if irregular is False else ANIMATE + IRREGULAR
    nouns = [(sg if n == "sg" else pl) for sg, pl, gg in pool if n == "pl" or gg == g]
    return [det or rng.choice(DETERMINERS[n]), rng.choice(nouns)]


def _obj(rng: random.Random, n: str | None = None, det: str | None = None, irregular: bool = False) -> list[str]:
    n = n or rng.choice(NUMBERS)
    if irregular:
        return _np(rng, n, rng.choice(GENDERS), det, irregular=True)
    sg, pl = rng.choice(INANIMATE)
    return [det or rng.choice(DETERMINERS[n]), sg if n == "sg" else pl]


def _subject_number(rng: random.Random) -> tuple[str, str]:
    n = rng.choice(NUMBERS)
    return n, rng.choice(GENDERS) if n == "sg" else "n"


def _verb(rng: random.Random, n: str, verbs=INTRANSITIVE + TRANSITIVE) -> str:
    return rng.choice(verbs)[1 if n == "sg" else 0]


def _det_noun(rng, irregular):
    n = rng.choice(NUMBERS)
    det = rng.choice([d for d in DETERMINERS[n] if d in DEMONSTRATIVE])
    sn, sg = _subject_number(rng)
    words = _np(rng, sn, sg, det=rng.choice(["the", "my"])) + [_verb(rng, sn, TRANSITIVE)]
    obj = _obj(rng, n, det, irregular=irregular)
    return words + obj, len(words), DEMONSTRATIVE


def _sv_simple(rng):
    n, g = _subject_number(rng)
    words = _np(rng, n, g, irregular=False)
    return words + [_verb(rng, n, INTRANSITIVE)], len(words), VERB_NUMBER


def _sv_irregular(rng):
    n, g = _subject_number(rng)
    words = _np(rng, n, g, irregular=True)
    return words + [_verb(rng, n, INTRANSITIVE)], len(words), VERB_NUMBER


def _sv_pp(rng):
    n, g = _subject_number(rng)
    other = "pl" if n == "sg" else "sg"  # the attractor has the other number
    words = _np(rng, n, g) + [rng.choice(PREPOSITIONS)] + _np(rng, other, rng.choice(GENDERS))
    return words + [_verb(rng, n, INTRANSITIVE)], len(words), VERB_NUMBER


def _sv_relative(rng):
    n, g = _subject_number(rng)
    other = "pl" if n == "sg" else "sg"
    words = _np(rng, n, g) + ["that"] + _np(rng, other, rng.choice(GENDERS)) + [_verb(rng, other, TRANSITIVE)]
    return words + [COPULA[n], rng.choice(ADJECTIVES)], len(words), AUX_NUMBER


def _anaphor(rng):
    n, g = _subject_number(rng)
    refl = REFLEXIVES[(n, g)] if n == "sg" else "themselves"
    words = _np(rng, n, g) + [rng.choice([v for v in TRANSITIVE if v[0] in REFLEXIVE_VERBS])[1 if n == "sg" else 0]]
    return words + [refl], len(words), REFLEXIVE_NUMBER


def _transitive(rng):
    words = _np(rng, "sg", rng.choice(GENDERS))
    return words + [_verb(rng, "sg", TRANSITIVE)] + _obj(rng), len(words), TRANSITIVITY


def _negation(rng):
    n, g = _subject_number(rng)
    words = _np(rng, n, g)
    return words + [DO[n], "not", rng.choice(INTRANSITIVE)[0]], len(words), AUX_NUMBER


def _question(rng):
    n, g = _subject_number(rng)
    return [DO[n]] + _np(rng, n, g) + [rng.choice(INTRANSITIVE)[0]], 0, AUX_NUMBER


# UID -> (builder, field, linguistics_term, final punctuation)
PARADIGMS = {
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
        # The grammar has the last word: a swap that happens to stay grammatical is drawn again.
        if is_grammatical(good_text) and not is_grammatical(bad_text):
            return good_text, bad_text


def generate_minimal_pairs(pairs_per_phenomenon: int, seed: int) -> dict[str, list[dict]]:
    """UID -> BLiMP-format records (sentence_good, sentence_bad, UID, field, linguistics_term, pairID)."""
    out = {}
    for uid, (_, field, term, _) in PARADIGMS.items():
        rng = random.Random(f"pairs-{seed}-{uid}")
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
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
        os.replace(tmp, path)
        paths.append(path)
    return paths
