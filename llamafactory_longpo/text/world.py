"""A small fictional world (people, cities, companies) rendered as plain prose.

The demo's short-to-long records (``llamafactory_longpo.demo``), the evaluation tasks' distractor text and
multi-hop questions (``llamafactory_longpo.eval.tasks``) and the tiny model's tokenizer all draw on it, so
it lives apart from each of them. Deterministic for a ``random.Random``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

FIRST = [
    "Ada",
    "Bruno",
    "Carla",
    "Dmitri",
    "Elena",
    "Farid",
    "Greta",
    "Hugo",
    "Ines",
    "Jonas",
    "Kira",
    "Luca",
    "Mara",
    "Nils",
    "Olga",
    "Pavel",
    "Quinn",
    "Rosa",
    "Stefan",
    "Tara",
    "Umar",
    "Vera",
    "Wim",
    "Yara",
]
LAST = [
    "Albers",
    "Brandt",
    "Castell",
    "Dorn",
    "Eklund",
    "Falk",
    "Garnier",
    "Holm",
    "Ivers",
    "Jansen",
    "Kovac",
    "Lindqvist",
    "Moreau",
    "Novak",
    "Orlov",
    "Petrov",
    "Quist",
    "Rinaldi",
    "Sorensen",
    "Toivonen",
]
CITY_A = ["Bel", "Cor", "Dun", "Esk", "Fal", "Gor", "Hal", "Ist", "Kel", "Lor", "Mar", "Nor", "Oster", "Pell", "Ros", "Tarn"]
CITY_B = ["haven", "mouth", "ford", "wick", "dale", "burg", "stead", "mere", "port", "holm"]
COUNTRIES = ["Veloria", "Ostmark", "Calderon", "Peralta", "Norvania", "Sudland", "Marisco", "Tavora", "Eldmark", "Quessa"]
FIELDS = ["shipbuilding", "textiles", "printing", "glassware", "clockmaking", "brewing", "mapmaking", "ceramics"]
COMPANY_A = ["North", "Silver", "Iron", "Blue", "Golden", "Grey", "Red", "Old", "Bright", "Stone"]
COMPANY_B = ["Works", "Company", "Guild", "Trading House", "Foundry", "Mills", "Press", "Yards"]
FILLER = [
    "Local records describe the place as busy in summer and quiet in winter.",
    "Historians still argue about the details of its early years.",
    "A small museum keeps letters and drawings from that period.",
    "Travellers of the time often mentioned the long market days.",
    "Much of the archive was copied by hand in the following century.",
    "The surrounding hills were known for sheep farming and orchards.",
    "Several bridges were rebuilt after a flood in the spring.",
    "The annual fair drew merchants from the neighbouring valleys.",
]


@dataclass
class World:
    people: list[dict[str, Any]]
    cities: dict[str, str]  # city -> country
    companies: list[dict[str, Any]]


def make_world(rng: random.Random, n_companies: int = 96) -> World:
    cities: dict[str, str] = {}
    while len(cities) < 60:
        cities[rng.choice(CITY_A) + rng.choice(CITY_B)] = rng.choice(COUNTRIES)
    names = sorted({f"{first} {last}" for first in FIRST for last in LAST})
    rng.shuffle(names)
    people = [{"name": n, "city": rng.choice(sorted(cities)), "year": rng.randint(1801, 1899)} for n in names[:n_companies]]
    companies = []
    used: set[str] = set()
    for person in people:
        name = f"{rng.choice(COMPANY_A)} {rng.choice(FIELDS).title()} {rng.choice(COMPANY_B)}"
        while name in used:
            name = f"{rng.choice(COMPANY_A)} {rng.choice(FIELDS).title()} {rng.choice(COMPANY_B)}"
        used.add(name)
        hq = rng.choice(sorted(cities))
        companies.append({"name": name, "founder": person, "hq": hq, "year": person["year"] + rng.randint(20, 45)})
    return World(people, cities, companies)


def filler(rng: random.Random, k: int = 2) -> str:
    return " ".join(rng.sample(FILLER, k))


def person_paragraph(w: World, p: dict[str, Any], rng: random.Random) -> str:
    return (
        f"{p['name']} was born in {p['year']} in the city of {p['city']}. {filler(rng)} "
        f"Friends remembered {p['name'].split()[0]} as patient and fond of long walks."
    )


def city_paragraph(w: World, city: str, rng: random.Random) -> str:
    return f"{city} is a city in {w.cities[city]}. {filler(rng)} Its old harbour district is now a park."


def company_paragraph(w: World, c: dict[str, Any], rng: random.Random) -> str:
    return (
        f"The {c['name']} was founded in {c['year']} by {c['founder']['name']}. Its headquarters were in {c['hq']}. {filler(rng)}"
    )


def paragraphs(seed: int = 0) -> list[str]:
    """Every person, city and company of one world as a paragraph: needle-free distractor prose."""
    rng = random.Random(seed)
    w = make_world(rng)
    return (
        [person_paragraph(w, p, rng) for p in w.people]
        + [city_paragraph(w, c, rng) for c in sorted(w.cities)]
        + [company_paragraph(w, c, rng) for c in w.companies]
    )
