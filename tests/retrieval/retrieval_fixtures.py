"""Small corpora written by the tests themselves (helpers importable from the retrieval tests)."""

from __future__ import annotations

import json
from pathlib import Path

# Twelve short "articles" on distinct topics, so a title query has one clearly right answer.
ARTICLES = {
    "Photosynthesis": "Photosynthesis is the process by which green plants use sunlight, water and carbon dioxide "
    "to make glucose and release oxygen in their chloroplasts.",
    "Mount Everest": "Mount Everest is Earth's highest mountain above sea level, in the Himalayas on the border "
    "between Nepal and China, first climbed in 1953.",
    "Jazz": "Jazz is a music genre that originated in the African-American communities of New Orleans, with "
    "swing, blue notes and improvisation.",
    "Volcano": "A volcano is a rupture in the crust of a planet through which lava, volcanic ash and gases escape "
    "from a magma chamber below the surface.",
    "Chess": "Chess is a board game for two players played on a checkered board with sixty-four squares; each "
    "player begins with sixteen pieces including a king.",
    "Penicillin": "Penicillin is a group of antibiotics discovered by Alexander Fleming in 1928, derived from "
    "Penicillium moulds and used against bacterial infections.",
    "Roman Empire": "The Roman Empire was the post-Republican state of ancient Rome, ruled by emperors from "
    "Augustus onward around the Mediterranean Sea.",
    "Honey bee": "The honey bee is a eusocial flying insect that builds colonies with wax combs and produces "
    "honey from the nectar of flowers.",
    "Solar eclipse": "A solar eclipse occurs when the Moon passes between Earth and the Sun, blocking the Sun's "
    "light for viewers in the Moon's shadow.",
    "Bicycle": "A bicycle is a pedal-driven, human-powered vehicle with two wheels attached to a frame, one "
    "behind the other.",
    "Origami": "Origami is the Japanese art of paper folding, turning a flat square sheet of paper into a "
    "finished sculpture without cutting or gluing.",
    "Tsunami": "A tsunami is a series of ocean waves caused by the displacement of a large volume of water, "
    "usually by an undersea earthquake.",
}


def write_jsonl(path: Path, records: list) -> Path:
    """Write one JSON value per line (strings are written verbatim, to make malformed lines)."""
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def article_records() -> list[dict]:
    return [{"id": f"doc{i}", "title": t, "text": x} for i, (t, x) in enumerate(ARTICLES.items())]
