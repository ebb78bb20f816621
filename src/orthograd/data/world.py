"""General knowledge for the offline TOFU-style benchmark's "pre-training": world facts and real authors.

TOFU's model utility also reads what the model knew before it learnt the fictitious authors (its Real Authors and
World Facts sets), so damage to general knowledge shows. Offline, that knowledge is built here: countries (capital,
currency, language, continent), chemical elements (symbol, atomic number), the calendar (each month's number and
the month after it, from Python's ``calendar``) and real authors (birth year, best-known work, language written
in). Each fact is asked in a few phrasings and answered in a sentence; its wrong options are the same sentence
with other values of the fact (as TOFU's perturbed answers), and ``paraphrase`` is the answer itself, as TOFU
reads these sets.
"""

from __future__ import annotations

import calendar
import random
from dataclasses import dataclass

from orthograd.data.authors import QAPair

# country: capital, currency, language, continent
COUNTRIES: dict[str, tuple[str, str, str, str]] = {
    "France": ("Paris", "euro", "French", "Europe"), "Germany": ("Berlin", "euro", "German", "Europe"),
    "Italy": ("Rome", "euro", "Italian", "Europe"), "Spain": ("Madrid", "euro", "Spanish", "Europe"),
    "Portugal": ("Lisbon", "euro", "Portuguese", "Europe"), "the Netherlands": ("Amsterdam", "euro", "Dutch", "Europe"),
    "Greece": ("Athens", "euro", "Greek", "Europe"), "Austria": ("Vienna", "euro", "German", "Europe"),
    "Finland": ("Helsinki", "euro", "Finnish", "Europe"), "Poland": ("Warsaw", "zloty", "Polish", "Europe"),
    "Sweden": ("Stockholm", "krona", "Swedish", "Europe"), "Norway": ("Oslo", "krone", "Norwegian", "Europe"),
    "Denmark": ("Copenhagen", "krone", "Danish", "Europe"), "Iceland": ("Reykjavik", "krona", "Icelandic", "Europe"),
    "the United Kingdom": ("London", "pound", "English", "Europe"),
    "Hungary": ("Budapest", "forint", "Hungarian", "Europe"),
    "the Czech Republic": ("Prague", "koruna", "Czech", "Europe"),
    "Romania": ("Bucharest", "leu", "Romanian", "Europe"), "Ukraine": ("Kyiv", "hryvnia", "Ukrainian", "Europe"),
    "Japan": ("Tokyo", "yen", "Japanese", "Asia"), "China": ("Beijing", "yuan", "Chinese", "Asia"),
    "India": ("New Delhi", "rupee", "Hindi", "Asia"), "South Korea": ("Seoul", "won", "Korean", "Asia"),
    "Thailand": ("Bangkok", "baht", "Thai", "Asia"), "Vietnam": ("Hanoi", "dong", "Vietnamese", "Asia"),
    "Indonesia": ("Jakarta", "rupiah", "Indonesian", "Asia"), "Pakistan": ("Islamabad", "rupee", "Urdu", "Asia"),
    "Iran": ("Tehran", "rial", "Persian", "Asia"), "Saudi Arabia": ("Riyadh", "riyal", "Arabic", "Asia"),
    "Bangladesh": ("Dhaka", "taka", "Bengali", "Asia"), "Malaysia": ("Kuala Lumpur", "ringgit", "Malay", "Asia"),
    "Nepal": ("Kathmandu", "rupee", "Nepali", "Asia"), "Jordan": ("Amman", "dinar", "Arabic", "Asia"),
    "Iraq": ("Baghdad", "dinar", "Arabic", "Asia"), "Mongolia": ("Ulaanbaatar", "tugrik", "Mongolian", "Asia"),
    "Egypt": ("Cairo", "pound", "Arabic", "Africa"), "Nigeria": ("Abuja", "naira", "English", "Africa"),
    "Kenya": ("Nairobi", "shilling", "Swahili", "Africa"), "Ethiopia": ("Addis Ababa", "birr", "Amharic", "Africa"),
    "Morocco": ("Rabat", "dirham", "Arabic", "Africa"), "Ghana": ("Accra", "cedi", "English", "Africa"),
    "Algeria": ("Algiers", "dinar", "Arabic", "Africa"), "Tunisia": ("Tunis", "dinar", "Arabic", "Africa"),
    "the United States": ("Washington", "dollar", "English", "North America"),
    "Canada": ("Ottawa", "dollar", "English", "North America"),
    "Mexico": ("Mexico City", "peso", "Spanish", "North America"),
    "Cuba": ("Havana", "peso", "Spanish", "North America"),
    "Brazil": ("Brasilia", "real", "Portuguese", "South America"),
    "Argentina": ("Buenos Aires", "peso", "Spanish", "South America"),
    "Chile": ("Santiago", "peso", "Spanish", "South America"), "Peru": ("Lima", "sol", "Spanish", "South America"),
    "Colombia": ("Bogota", "peso", "Spanish", "South America"),
    "Australia": ("Canberra", "dollar", "English", "Oceania"),
    "New Zealand": ("Wellington", "dollar", "English", "Oceania"),
}
# element: symbol, atomic number
ELEMENTS: dict[str, tuple[str, int]] = {
    "hydrogen": ("H", 1), "helium": ("He", 2), "lithium": ("Li", 3), "beryllium": ("Be", 4), "boron": ("B", 5),
    "carbon": ("C", 6), "nitrogen": ("N", 7), "oxygen": ("O", 8), "fluorine": ("F", 9), "neon": ("Ne", 10),
    "sodium": ("Na", 11), "magnesium": ("Mg", 12), "aluminium": ("Al", 13), "silicon": ("Si", 14),
    "phosphorus": ("P", 15), "sulfur": ("S", 16), "chlorine": ("Cl", 17), "argon": ("Ar", 18),
    "potassium": ("K", 19), "calcium": ("Ca", 20), "titanium": ("Ti", 22), "chromium": ("Cr", 24),
    "manganese": ("Mn", 25), "iron": ("Fe", 26), "cobalt": ("Co", 27), "nickel": ("Ni", 28), "copper": ("Cu", 29),
    "zinc": ("Zn", 30), "bromine": ("Br", 35), "krypton": ("Kr", 36), "silver": ("Ag", 47), "tin": ("Sn", 50),
    "iodine": ("I", 53), "xenon": ("Xe", 54), "tungsten": ("W", 74), "platinum": ("Pt", 78), "gold": ("Au", 79),
    "mercury": ("Hg", 80), "lead": ("Pb", 82), "uranium": ("U", 92),
}
# real author: birth year, best-known work, language written in
REAL_AUTHORS: dict[str, tuple[int, str, str]] = {
    "William Shakespeare": (1564, "Hamlet", "English"), "Jane Austen": (1775, "Pride and Prejudice", "English"),
    "Charles Dickens": (1812, "Oliver Twist", "English"), "Mary Shelley": (1797, "Frankenstein", "English"),
    "Emily Bronte": (1818, "Wuthering Heights", "English"), "Charlotte Bronte": (1816, "Jane Eyre", "English"),
    "Herman Melville": (1819, "Moby-Dick", "English"), "Edgar Allan Poe": (1809, "The Raven", "English"),
    "Mark Twain": (1835, "Adventures of Huckleberry Finn", "English"),
    "Oscar Wilde": (1854, "The Picture of Dorian Gray", "English"), "James Joyce": (1882, "Ulysses", "English"),
    "Virginia Woolf": (1882, "Mrs Dalloway", "English"),
    "Agatha Christie": (1890, "Murder on the Orient Express", "English"),
    "J. R. R. Tolkien": (1892, "The Lord of the Rings", "English"),
    "Aldous Huxley": (1894, "Brave New World", "English"),
    "F. Scott Fitzgerald": (1896, "The Great Gatsby", "English"),
    "William Faulkner": (1897, "The Sound and the Fury", "English"),
    "Ernest Hemingway": (1899, "The Old Man and the Sea", "English"),
    "John Steinbeck": (1902, "The Grapes of Wrath", "English"),
    "George Orwell": (1903, "Nineteen Eighty-Four", "English"),
    "Harper Lee": (1926, "To Kill a Mockingbird", "English"), "Chinua Achebe": (1930, "Things Fall Apart", "English"),
    "Toni Morrison": (1931, "Beloved", "English"), "Leo Tolstoy": (1828, "War and Peace", "Russian"),
    "Fyodor Dostoevsky": (1821, "Crime and Punishment", "Russian"),
    "Anton Chekhov": (1860, "The Cherry Orchard", "Russian"),
    "Victor Hugo": (1802, "Les Miserables", "French"), "Alexandre Dumas": (1802, "The Count of Monte Cristo", "French"),
    "Gustave Flaubert": (1821, "Madame Bovary", "French"),
    "Jules Verne": (1828, "Twenty Thousand Leagues Under the Seas", "French"),
    "Marcel Proust": (1871, "In Search of Lost Time", "French"), "Albert Camus": (1913, "The Stranger", "French"),
    "Miguel de Cervantes": (1547, "Don Quixote", "Spanish"), "Jorge Luis Borges": (1899, "Ficciones", "Spanish"),
    "Gabriel Garcia Marquez": (1927, "One Hundred Years of Solitude", "Spanish"),
    "Johann Wolfgang von Goethe": (1749, "Faust", "German"), "Thomas Mann": (1875, "The Magic Mountain", "German"),
    "Hermann Hesse": (1877, "Siddhartha", "German"), "Franz Kafka": (1883, "The Trial", "German"),
    "Dante Alighieri": (1265, "The Divine Comedy", "Italian"), "Umberto Eco": (1932, "The Name of the Rose", "Italian"),
    "Haruki Murakami": (1949, "Norwegian Wood", "Japanese"),
}

# fact -> (question phrasings, answer); {s}: the subject, {v}: the value
Templates = dict[str, tuple[tuple[str, ...], str]]
COUNTRY_FACTS: Templates = {
    "capital": (("What is the capital of {s}?", "Which city is the capital of {s}?"), "The capital of {s} is {v}."),
    "currency": (("What is the currency of {s}?", "Which currency is used in {s}?"), "The currency of {s} is the {v}."),
    "language": (("What language is spoken in {s}?", "What is the main language of {s}?"),
                 "The main language of {s} is {v}."),
    "continent": (("On which continent is {s}?", "Where in the world is {s}?"), "{s} is in {v}."),
}
ELEMENT_FACTS: Templates = {
    "symbol": (("What is the chemical symbol of {s}?", "Which symbol stands for {s}?"),
               "The chemical symbol of {s} is {v}."),
    "number": (("What is the atomic number of {s}?", "How many protons does an atom of {s} have?"),
               "The atomic number of {s} is {v}."),
}
MONTH_FACTS: Templates = {
    "number": (("Which month of the year is {s}?", "What is the number of the month {s}?"),
               "{s} is month number {v} of the year."),
    "next": (("Which month comes after {s}?", "What month follows {s}?"), "The month after {s} is {v}."),
}
AUTHOR_FACTS: Templates = {
    "year": (("When was {s} born?", "In what year was {s} born?"), "{s} was born in {v}."),
    "work": (("What is the best-known work of {s}?", "Which book is {s} famous for?"),
             "The best-known work of {s} is {v}."),
    "language": (("In which language did {s} write?", "What language did {s} write in?"), "{s} wrote in {v}."),
}


@dataclass(frozen=True)
class Knowledge:
    """The pre-training knowledge: every phrasing of every fact (``training``) and one question per fact in each
    evaluated set (``world_facts``, ``real_authors``), with wrong options."""

    training: list[QAPair]
    world_facts: list[QAPair]
    real_authors: list[QAPair]


def _months() -> dict[str, tuple[int, str]]:
    names = list(calendar.month_name)[1:]
    return {name: (m, names[m % 12]) for m, name in enumerate(names, start=1)}


def _pairs(subjects: dict[str, tuple], facts: Templates, *, options: int, rng: random.Random,
           first_index: int) -> tuple[list[QAPair], list[QAPair]]:
    """Every phrasing of every fact of every subject, and the evaluated ones (each fact's first phrasing)."""
    pairs, evaluated = [], []
    for offset, (subject, values) in enumerate(subjects.items()):
        for position, (fact, (questions, answer)) in enumerate(facts.items()):
            true = str(values[position])
            pool = sorted({str(v[position]) for v in subjects.values()} - {true})
            wrong = rng.sample(pool, min(options, len(pool)))
            text = answer.format(s=subject, v=true)
            text = text[0].upper() + text[1:]
            perturbed = tuple(answer.format(s=subject, v=w)[0].upper() + answer.format(s=subject, v=w)[1:]
                              for w in wrong)
            for phrasing, question in enumerate(questions):
                pairs.append(QAPair(author=first_index + offset, fact=fact, question=question.format(s=subject),
                                    answer=text, paraphrase=text, perturbed=perturbed, held_out=False))
                if phrasing == 0:
                    evaluated.append(pairs[-1])
    return pairs, evaluated


def general_knowledge(*, options: int = 3, seed: int = 0) -> Knowledge:
    """Every fact with ``options`` wrong options each (the same for a given seed); every phrasing is trained on
    (this is knowledge the model had before), the first phrasing of each fact is evaluated."""
    rng = random.Random(seed)
    countries = _pairs(COUNTRIES, COUNTRY_FACTS, options=options, rng=rng, first_index=0)
    elements = _pairs(ELEMENTS, ELEMENT_FACTS, options=options, rng=rng, first_index=len(COUNTRIES))
    months = _pairs(_months(), MONTH_FACTS, options=options, rng=rng, first_index=len(COUNTRIES) + len(ELEMENTS))
    people = _pairs(REAL_AUTHORS, AUTHOR_FACTS, options=options, rng=rng, first_index=0)
    world = (countries, elements, months)
    return Knowledge(training=[p for part in (*world, people) for p in part[0]],
                     world_facts=[p for part in world for p in part[1]], real_authors=people[1])
