"""Question sets the project writes itself, so the demo and the tests need no downloaded benchmark.

- ``arith``: GSM-Hard-style word problems (6-7 digit quantities, 1-3 operations, exact answers) from
  eight templates, generated from (seed, split, index). A question's split is decided by a hash of its
  text, so train and test can never share a question.
- ``facts``: hand-written one- and two-hop factual questions whose answers occur verbatim in the
  extract of ``source_title`` in the vital-articles corpus (the embedded retrieval corpus).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from typing import Literal

Split = Literal["train", "test"]
SPLIT_BUCKET: dict[str, int] = {"train": 0, "test": 1}
MAX_ATTEMPTS = 1000  # per question; each attempt lands in the wanted split with probability 1/2


@dataclass(frozen=True)
class ArithProblem:
    """One generated problem. ``expression`` recomputes ``answer`` exactly (with Fractions)."""

    question: str
    answer: str
    template: str
    expression: str
    operations: int


def _big(rng: random.Random) -> int:
    return rng.randint(100_000, 9_999_999)


_NAMES = [
    "Marin",
    "Priya",
    "Tomas",
    "Aiko",
    "Kwame",
    "Lena",
    "Diego",
    "Fatima",
    "Oskar",
    "Mei",
    "Jonah",
    "Sofia",
]
_FOODS = ["apples", "oranges", "plums", "crackers", "carrots", "cookies"]
_GOODS = ["chairs", "lamps", "bicycles", "kettles", "backpacks", "clocks"]
_PURCHASES = ["house", "boat", "farm", "truck", "workshop"]


def _t_eat(rng: random.Random) -> tuple[str, str, Fraction]:
    a, b = rng.sample(_NAMES, 2)
    food, n, days = rng.choice(_FOODS), _big(rng), rng.randint(3, 60)
    q = f"{a} and a neighbor, {b}, each eat {n} {food} a day. How many {food} do they eat in {days} days?"
    return q, f"2 * {n} * {days}", Fraction(2 * n * days)


def _t_warehouse(rng: random.Random) -> tuple[str, str, Fraction]:
    stock = _big(rng)
    shipped, received = rng.randint(10_000, stock - 1), _big(rng)
    q = (
        f"A warehouse holds {stock} boxes. On Monday it ships {shipped} boxes and on Tuesday it receives "
        f"{received} new boxes. How many boxes are in the warehouse at the end of Tuesday?"
    )
    return q, f"{stock} - {shipped} + {received}", Fraction(stock - shipped + received)


def _t_sales(rng: random.Random) -> tuple[str, str, Fraction]:
    goods, n, weeks = rng.choice(_GOODS), _big(rng), rng.randint(2, 12)
    price = f"{Decimal(rng.randint(101, 9999)) / 100:.2f}"  # cents: the answer is an exact decimal
    q = (
        f"A factory makes {n} {goods} per week and sells each one for ${price}. "
        f"How many dollars does it earn in {weeks} weeks?"
    )
    return q, f"{n} * {price} * {weeks}", Fraction(n) * Fraction(price) * weeks


def _t_share(rng: random.Random) -> tuple[str, str, Fraction]:
    schools = rng.randint(3, 40)
    each = Fraction(rng.randint(20_000, 2_000_000), 2)  # whole dollars or half dollars
    total = each * schools
    q = (
        f"A charity raised ${_exact_decimal(total)} and shares it equally among {schools} schools. "
        "How many dollars does each school receive?"
    )
    return q, f"{_exact_decimal(total)} / {schools}", each


def _t_percent(rng: random.Random) -> tuple[str, str, Fraction]:
    residents, pct = rng.randint(1_000, 99_999) * 100, rng.randint(5, 60)
    q = (
        f"A city has {residents} residents. {pct}% of them are children. "
        "How many residents of the city are not children?"
    )
    return q, f"{residents} - {residents} * {pct} / 100", Fraction(residents) - Fraction(residents * pct, 100)


def _t_trip(rng: random.Random) -> tuple[str, str, Fraction]:
    s1, d1, s2, d2 = _big(rng), rng.randint(2, 30), _big(rng), rng.randint(2, 30)
    q = (
        f"A cargo ship carries {s1} kilograms of grain on each of {d1} trips and then {s2} kilograms on "
        f"each of {d2} trips. How many kilograms of grain does it carry in total?"
    )
    return q, f"{s1} * {d1} + {s2} * {d2}", Fraction(s1 * d1 + s2 * d2)


def _t_savings(rng: random.Random) -> tuple[str, str, Fraction]:
    name, thing = rng.choice(_NAMES), rng.choice(_PURCHASES)
    monthly, months = _big(rng), rng.randint(6, 48)
    spent = rng.randint(100_000, monthly * months - 1)
    q = (
        f"{name} saves ${monthly} every month for {months} months and then spends ${spent} on a {thing}. "
        f"How many dollars does {name} have left?"
    )
    return q, f"{monthly} * {months} - {spent}", Fraction(monthly * months - spent)


def _t_library(rng: random.Random) -> tuple[str, str, Fraction]:
    owned, bought = _big(rng), _big(rng)
    q = f"A national library owns {owned} books and buys {bought} more. How many books does it own now?"
    return q, f"{owned} + {bought}", Fraction(owned + bought)


TEMPLATES: dict[str, Callable[[random.Random], tuple[str, str, Fraction]]] = {
    "eat": _t_eat,
    "warehouse": _t_warehouse,
    "sales": _t_sales,
    "share": _t_share,
    "percent": _t_percent,
    "trip": _t_trip,
    "savings": _t_savings,
    "library": _t_library,
}


def _exact_decimal(value: Fraction) -> str:
    """``value`` written as an exact decimal ("1234", "12.5"); raises if it has no finite expansion."""
    text = format(Decimal(value.numerator) / Decimal(value.denominator), "f")
    if Fraction(Decimal(text)) != value:
        raise ValueError(f"{value} has no exact decimal form")
    return text.rstrip("0").rstrip(".") if "." in text else text


def split_of(question: str) -> Split:
    """The split a question text belongs to: a pure function of the text, so splits cannot overlap."""
    bucket = int(hashlib.sha256(question.encode()).hexdigest(), 16) % 2
    return "train" if bucket == SPLIT_BUCKET["train"] else "test"


def generate_arith(seed: int, split: Split, num_questions: int) -> list[ArithProblem]:
    """``num_questions`` distinct problems of ``split``; the first k are the same for any num_questions >= k.

    Question i is drawn from ``Random(f"{seed}:{split}:{i}:{attempt}")``; attempts that land in the other
    split (by :func:`split_of`) or repeat an earlier question are redrawn.
    """
    if split not in SPLIT_BUCKET:
        raise ValueError(f"builtin:arith split must be 'train' or 'test', got {split!r}")
    problems: list[ArithProblem] = []
    seen: set[str] = set()
    for index in range(num_questions):
        for attempt in range(MAX_ATTEMPTS):
            rng = random.Random(f"{seed}:{split}:{index}:{attempt}")
            name = rng.choice(sorted(TEMPLATES))
            question, expression, value = TEMPLATES[name](rng)
            if split_of(question) == split and question not in seen:
                break
        else:  # pragma: no cover - probability 2**-1000
            raise RuntimeError(f"could not draw question {index} of split {split!r}")
        seen.add(question)
        operations = sum(expression.count(f" {op} ") for op in "+-*/")
        problems.append(ArithProblem(question, _exact_decimal(value), name, expression, operations))
    return problems


@dataclass(frozen=True)
class Fact:
    """A factual question; ``answer`` occurs verbatim in the corpus extract of ``source_title``.

    Two-hop questions name the first-hop article in ``bridge_title``: it identifies the entity whose
    article (``source_title``) holds the answer.
    """

    question: str
    answer: str
    source_title: str
    bridge_title: str | None = None

    @property
    def hops(self) -> int:
        return 1 if self.bridge_title is None else 2


FACTS: list[Fact] = [
    Fact("In which year was the film 2001: A Space Odyssey released?", "1968", "2001: A Space Odyssey"),
    Fact(
        "Who directed the film whose plot was inspired by the short story 'The Sentinel'?",
        "Stanley Kubrick",
        "2001: A Space Odyssey",
    ),
    Fact(
        "What nationality was the writer who co-wrote the screenplay of 2001: A Space Odyssey with Stanley Kubrick?",
        "English",
        "Arthur C. Clarke",
        "2001: A Space Odyssey",
    ),
    Fact(
        "What is the most recently measured height of Mount Everest in metres?", "8,848.86", "Mount Everest"
    ),
    Fact("How long is the Nile in kilometers?", "7,088", "Nile"),
    Fact("On which field in Paris does the Eiffel Tower stand?", "Champ de Mars", "Eiffel Tower"),
    Fact(
        "Which viaduct is the most famous railway bridge built by the engineer after whom the Eiffel Tower is named?",
        "Garabit Viaduct",
        "Gustave Eiffel",
        "Eiffel Tower",
    ),
    Fact(
        "For which event was the tower designed by the engineer who built the Statue of Liberty's metal framework "
        "built?",
        "1889 Universal Exposition",
        "Gustave Eiffel",
        "Statue of Liberty",
    ),
    Fact("Which element did Marie Curie discover together with radium?", "polonium", "Marie Curie"),
    Fact("With whom did Marie Curie share the 1903 Nobel Prize in Physics?", "Pierre Curie", "Marie Curie"),
    Fact("In which year did Albert Einstein receive the Nobel Prize in Physics?", "1921", "Albert Einstein"),
    Fact("In which year was Isaac Newton's Principia first published?", "1687", "Isaac Newton"),
    Fact(
        "Who presented the theory of natural selection jointly with Charles Darwin?",
        "Alfred Russel Wallace",
        "Charles Darwin",
    ),
    Fact(
        "On what date was On the Origin of Species published?", "24 November 1859", "On the Origin of Species"
    ),
    Fact("In which country is Shakespeare's longest play set?", "Denmark", "Hamlet"),
    Fact("Who murdered Prince Hamlet's father in Shakespeare's tragedy?", "Claudius", "Hamlet"),
    Fact(
        "Who painted the most famous painting in the Paris museum that also holds the Venus de Milo?",
        "Leonardo da Vinci",
        "Mona Lisa",
        "Louvre",
    ),
    Fact("What nickname does the city that is home to the Louvre have?", "City of Light", "Paris", "Louvre"),
    Fact("On which river is Paris located?", "Seine", "Paris"),
    Fact(
        "In which Madrid museum is Picasso's 1937 anti-war painting exhibited?",
        "Museo Reina Sofía",
        "Guernica (Picasso)",
        "Pablo Picasso",
    ),
    Fact("In which city was the Beatles formed?", "Liverpool", "The Beatles"),
    Fact(
        "With whom did John Lennon form the most successful songwriting partnership in history?",
        "Paul McCartney",
        "John Lennon",
    ),
    Fact("Who was the Command Module Pilot of Apollo 11?", "Michael Collins", "Apollo 11"),
    Fact("What is the average distance from Earth to the Moon in kilometers?", "384,399", "Moon"),
    Fact("What is Jupiter's orbital period in years?", "11.86", "Jupiter"),
    Fact(
        "Which dynasty built the best-known sections of the Great Wall of China?",
        "Ming dynasty",
        "Great Wall of China",
    ),
    Fact(
        "In which year did the reign of the Mughal emperor who commissioned the Taj Mahal begin?",
        "1628",
        "Shah Jahan",
        "Taj Mahal",
    ),
    Fact("In which city is the Taj Mahal?", "Agra", "Taj Mahal"),
    Fact("In which year did Alexander Fleming discover penicillin?", "1928", "Alexander Fleming"),
    Fact(
        "Which company did the inventor credited with patenting the first practical telephone co-found in 1885?",
        "American Telephone and Telegraph Company",
        "Alexander Graham Bell",
    ),
    Fact(
        "What was the real name of the author of Nineteen Eighty-Four?",
        "Eric Arthur Blair",
        "George Orwell",
        "Nineteen Eighty-Four",
    ),
    Fact("Which publisher published Nineteen Eighty-Four?", "Secker & Warburg", "Nineteen Eighty-Four"),
    Fact(
        "What was the Russian first name and patronymic of the author of War and Peace?",
        "Lev Nikolayevich",
        "Leo Tolstoy",
        "War and Peace",
    ),
    Fact(
        "In which museum has The Starry Night been held since 1941?",
        "Museum of Modern Art",
        "The Starry Night",
    ),
    Fact("How many metres above sea level is the highest mountain in Africa?", "5,895", "Mount Kilimanjaro"),
    Fact("Which is the deepest lake in the world?", "Lake Baikal", "Lake Baikal"),
    Fact("Into how many books is the Iliad divided?", "24", "Iliad"),
    Fact(
        "Who gave the name 'Divina' to the poem that Dante Alighieri began around 1308?",
        "Giovanni Boccaccio",
        "Dante Alighieri",
        "Divine Comedy",
    ),
    Fact("In which city was Galileo Galilei born?", "Pisa", "Galileo Galilei"),
    Fact(
        "What concept did the man whose analytical engine Ada Lovelace wrote about originate?",
        "digital programmable computer",
        "Charles Babbage",
        "Ada Lovelace",
    ),
    Fact(
        "At which university is the inventor of the World Wide Web a professorial research fellow?",
        "University of Oxford",
        "Tim Berners-Lee",
    ),
    Fact(
        "Which model of a general-purpose computer is named after the father of theoretical computer science?",
        "Turing machine",
        "Alan Turing",
    ),
    Fact("Who co-wrote Citizen Kane with Orson Welles?", "Herman J. Mankiewicz", "Citizen Kane"),
    Fact("Who directed the 1942 film Casablanca?", "Michael Curtiz", "Casablanca (film)"),
    Fact(
        "Who played Norman Bates in the 1960 horror film directed by the 'Master of Suspense'?",
        "Anthony Perkins",
        "Psycho (1960 film)",
        "Alfred Hitchcock",
    ),
    Fact("In which year did George Lucas sell Lucasfilm to The Walt Disney Company?", "2012", "George Lucas"),
    Fact(
        "Who played Vito Corleone in the 1972 film directed by Francis Ford Coppola?",
        "Marlon Brando",
        "The Godfather",
        "Francis Ford Coppola",
    ),
    Fact("In which year was the first part of Don Quixote published?", "1605", "Don Quixote"),
    Fact("In which country is Machu Picchu?", "Peru", "Machu Picchu"),
    Fact("Under which Khmer king was Angkor Wat constructed?", "Suryavarman II", "Angkor Wat"),
    Fact("Who is the protagonist of Pride and Prejudice?", "Elizabeth Bennet", "Pride and Prejudice"),
    Fact(
        "Which novel did the author of Adventures of Huckleberry Finn publish in 1889?",
        "A Connecticut Yankee in King Arthur's Court",
        "Mark Twain",
        "Adventures of Huckleberry Finn",
    ),
    Fact(
        "What is the name of Captain Ahab's whaling ship in Herman Melville's 1851 novel?",
        "Pequod",
        "Moby-Dick",
    ),
    Fact(
        "Which family's story is told in the 1967 novel by the Colombian winner of the 1982 Nobel Prize in "
        "Literature?",
        "Buendía",
        "One Hundred Years of Solitude",
        "Gabriel García Márquez",
    ),
]


def facts_split(split: Split) -> list[tuple[int, Fact]]:
    """(index in FACTS, fact) pairs of ``split``: even indices are train, odd indices test."""
    if split not in SPLIT_BUCKET:
        raise ValueError(f"builtin:facts split must be 'train' or 'test', got {split!r}")
    return [(i, f) for i, f in enumerate(FACTS) if i % 2 == SPLIT_BUCKET[split]]
