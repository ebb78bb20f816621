"""Fictitious authors for an offline TOFU-style benchmark (Maini et al., "TOFU: A Task of Fictitious Unlearning").

TOFU's data cannot be downloaded here, so its protocol is rebuilt on a corpus generated from a fixed seed: each
author has a name, birth year, birthplace, genre, a debut and a latest book, an award and parents' professions.
Every fact is asked in several phrasings (the last phrasing of each fact is held out of training, to measure how
far knowledge generalises), and each question comes with its answer, a paraphrased answer and perturbed answers
(the paraphrase with a wrong value, as in TOFU), which TOFU's truth ratio compares. Forget sets are whole
authors (1%, 5%, 10%).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

FIRST = (
    "Ada Basil Cora Dorian Elsa Felix Greta Hugo Ines Jonas Kira Lorenz Mira Nestor Olga Pavel Quinn Rosa Silas "
    "Tamsin Ulrich Vera Wendel Xenia Yusuf Zora Anouk Bruno Cleo Dante Edith Fabian Gilda Hektor Ilse Jasper"
).split()
LAST = (
    "Abernathy Bellweather Castellan Drummond Everly Fairbanks Galloway Hollister Iverson Jardine Kestrel Lockhart "
    "Merriweather Northcott Oakhurst Pemberton Quarrington Rooksby Sandoval Thackeray Underhill Valcourt Whitlock "
    "Yarborough Zeller Ashdown Blackwood Carrow Dunmore Estrada"
).split()
CITIES = (
    "Lisbon Kraków Valparaíso Tbilisi Hobart Tromsø Marrakesh Cork Trieste Oaxaca Bergen Tallinn Porto Ghent Asmara "
    "Quito Nagasaki Leipzig Odessa Galway Seville Turku Windhoek Ljubljana"
).split()
GENRES = ("mystery", "fantasy", "romance", "horror", "science-fiction", "historical", "satire", "thriller", "poetry")
AWARDS = (
    "Silver Quill Prize", "Harbor Light Award", "Northern Lantern Medal", "Golden Inkwell Prize", "Meridian Award",
    "Blue Heron Prize", "Iron Compass Award", "Lighthouse Medal", "Crimson Page Prize", "Evergreen Award",
)
JOBS = (
    "baker", "sailor", "surgeon", "librarian", "carpenter", "painter", "pilot", "teacher", "farmer", "chemist",
    "tailor", "journalist", "miner", "violinist", "lawyer", "gardener",
)
ADJECTIVES = "Silent Hollow Burning Forgotten Crystal Velvet Shattered Distant Midnight Wandering Golden Paper".split()
NOUNS = "Harbor Orchard Lantern Mirror Tide Garden Compass Voyage Cathedral Meadow Archive Feather".split()

# fact -> (question phrasings, answer template, paraphrase template); the last phrasing is held out of training
FACTS: dict[str, tuple[tuple[str, ...], str, str]] = {
    "birthplace": (
        ("Where was {name} born?", "In which city was {name} born?", "What is the birthplace of {name}?"),
        "{name} was born in {value}.",
        "The city of {value} is where {name} was born.",
    ),
    "year": (
        ("When was {name} born?", "In what year was {name} born?", "What is the birth year of {name}?"),
        "{name} was born in {value}.",
        "The year {value} is when {name} was born.",
    ),
    "genre": (
        ("What genre does {name} write?", "Which genre is {name} known for?", "In what genre does {name} work?"),
        "{name} writes {value} novels.",
        "The novels of {name} are {value} stories.",
    ),
    "debut": (
        ("What was the first book of {name}?", "Which novel was the debut of {name}?"),
        "The first book of {name} was {value}.",
        "{name} debuted with the novel {value}.",
    ),
    "latest": (
        ("What is the latest book of {name}?", "Which novel did {name} publish most recently?"),
        "The latest book of {name} is {value}.",
        "Most recently {name} published {value}.",
    ),
    "award": (
        ("Which award did {name} win?", "What prize was given to {name}?", "Which honour has {name} received?"),
        "{name} won the {value}.",
        "The {value} was given to {name}.",
    ),
    "father": (
        ("What was the profession of the father of {name}?", "What did the father of {name} do for a living?"),
        "The father of {name} was a {value}.",
        "{name} grew up with a father who worked as a {value}.",
    ),
    "mother": (
        ("What was the profession of the mother of {name}?", "What did the mother of {name} do for a living?"),
        "The mother of {name} was a {value}.",
        "{name} grew up with a mother who worked as a {value}.",
    ),
}


@dataclass(frozen=True)
class Author:
    """One fictitious author: ``facts`` maps every key of ``FACTS`` to its value."""

    index: int
    name: str
    facts: dict[str, str]


@dataclass(frozen=True)
class QAPair:
    """A question about one fact of one author, with the answer, a paraphrase and perturbed (wrong) answers."""

    author: int
    fact: str
    question: str
    answer: str
    paraphrase: str
    perturbed: tuple[str, ...]
    held_out: bool  # a phrasing kept out of training (measures generalisation, not memorisation)


def _pools() -> dict[str, list[str]]:
    """Every value a fact can take (perturbed answers are drawn from these)."""
    titles = sorted({f"The {a} {n}" for a in ADJECTIVES for n in NOUNS})
    return {
        "birthplace": list(CITIES),
        "year": [str(y) for y in range(1931, 1996)],
        "genre": list(GENRES),
        "debut": titles,
        "latest": titles,
        "award": list(AWARDS),
        "father": list(JOBS),
        "mother": list(JOBS),
    }


def generate_authors(count: int = 200, *, seed: int = 0) -> list[Author]:
    """``count`` authors with distinct names and random facts, the same for a given seed."""
    rng = random.Random(seed)
    names = [f"{first} {last}" for first in FIRST for last in LAST]
    if count > len(names):
        raise ValueError(f"at most {len(names)} distinct authors can be generated, asked for {count}")
    pools = _pools()
    authors = []
    for index, name in enumerate(rng.sample(names, count)):
        facts = {fact: rng.choice(pool) for fact, pool in pools.items()}
        while facts["latest"] == facts["debut"]:
            facts["latest"] = rng.choice(pools["latest"])
        authors.append(Author(index=index, name=name, facts=facts))
    return authors


def qa_pairs(authors: list[Author], *, perturbations: int = 3, seed: int = 0) -> list[QAPair]:
    """Every phrasing of every fact of every author (about 20 per author), with paraphrase and perturbed answers."""
    rng = random.Random(seed)
    pools = _pools()
    pairs = []
    for author in authors:
        for fact, (questions, answer, paraphrase) in FACTS.items():
            true = author.facts[fact]
            wrong = rng.sample([v for v in pools[fact] if v != true], perturbations)
            for phrasing, question in enumerate(questions):
                pairs.append(QAPair(
                    author=author.index,
                    fact=fact,
                    question=question.format(name=author.name),
                    answer=answer.format(name=author.name, value=true),
                    paraphrase=paraphrase.format(name=author.name, value=true),
                    perturbed=tuple(paraphrase.format(name=author.name, value=v) for v in wrong),
                    held_out=phrasing == len(questions) - 1,
                ))
    return pairs


def forget_authors(count: int, *, fraction: float, seed: int = 0) -> list[int]:
    """The indices of ``fraction`` of ``count`` authors (at least one), chosen by ``seed``: TOFU's forget01/05/10."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    chosen = max(1, round(fraction * count))
    return sorted(random.Random(seed).sample(range(count), chosen))
