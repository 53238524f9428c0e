"""Synthetic factual recall: many entities with attributes, written in varied templates.

Everything comes from a seed (no downloads). Training text holds every fact in every
statement template, plus question-answer pairs in the training question templates;
evaluation asks each fact with a question template never seen in training, so a correct
answer needs the fact stored and the question understood. Tokens are whole words.
"""
from __future__ import annotations

import random
from collections.abc import Iterator

import torch
from torch import Tensor

__all__ = ["ATTRIBUTES", "FactSet"]

_CITIES = (
    "Paris Lagos Lima Oslo Kyoto Cairo Quito Dakar Perth Austin Hanoi Porto Bern Riga Turin Accra "
    "Denver Mumbai Seoul Dublin Vienna Santiago Nairobi Havana Toronto Lisbon Prague Manila Boston "
    "Athens Madrid Ottawa Bogota Tunis Kampala Zagreb Helsinki Sydney Geneva Montreal"
).split()
_FIELDS = (
    "physics chemistry biology medicine law history economics philosophy music architecture "
    "geology astronomy linguistics mathematics nursing agriculture sociology engineering "
    "psychology literature"
).split()
_YEARS = [str(y) for y in range(1920, 2000)]
_SYLLABLES = (
    "ka lo ren mi ta vo shi ne dor ba li ur sel mo ran te ga fi no pel ra chi vin do ma zu ker sa lin bo "
    "ve tor an is el gar hal nim os pri"
).split()

# attribute -> (values or None for generated names, statement templates, question
# templates). The LAST question template of each attribute is held out for evaluation.
ATTRIBUTES: dict[str, tuple[list[str] | None, list[str], list[str]]] = {
    "birth_year": (
        _YEARS,
        ["{name} was born in {value} .", "In {value} , {name} was born .",
         "The birth year of {name} is {value} .", "{name} came into the world in {value} ."],
        ["When was {name} born ?", "In which year was {name} born ?", "What year was {name} born in ?"],
    ),
    "city": (
        _CITIES,
        ["{name} lives in {value} .", "{name} has a home in {value} .",
         "The city where {name} lives is {value} .", "{name} resides in {value} ."],
        ["Where does {name} live ?", "In which city does {name} live ?", "What city is home to {name} ?"],
    ),
    "employer": (
        None,
        ["{name} works for {value} .", "{name} is employed by {value} .",
         "The employer of {name} is {value} .", "{name} has a job at {value} ."],
        ["Who employs {name} ?", "For which company does {name} work ?", "Which company does {name} work for ?"],
    ),
    "field": (
        _FIELDS,
        ["{name} studied {value} .", "{name} holds a degree in {value} .",
         "The field of study of {name} is {value} .", "{name} majored in {value} ."],
        ["What did {name} study ?", "Which subject did {name} study ?", "In what field does {name} have a degree ?"],
    ),
}
_N_EMPLOYERS = 40
SEP, PAD = "<s>", "<pad>"


class FactSet:
    """Entities (first + last name) with one value per attribute, drawn uniformly from a seed."""

    def __init__(self, n_entities: int = 1000, seed: int = 0) -> None:
        rng = random.Random(seed)
        pool = max(8, int((2 * n_entities) ** 0.5) + 1)  # first x last names: ~2 combos per entity
        fixed = {PAD, SEP, "Q", "A", ":"}
        for values, statements, questions in ATTRIBUTES.values():
            fixed |= set(values or ())
            for t in statements + questions:
                fixed |= set(t.split()) - {"{name}", "{value}"}
        words = self._words(rng, 2 * pool + _N_EMPLOYERS, taken=fixed)
        first, last, employers = words[:pool], words[pool : 2 * pool], words[2 * pool :]
        pairs = rng.sample([(given, family) for given in first for family in last], n_entities)
        self.names = [f"{given} {family}" for given, family in pairs]
        choices = {a: spec[0] or employers for a, spec in ATTRIBUTES.items()}
        # facts[e][attribute] = value
        self.facts = [{a: rng.choice(choices[a]) for a in ATTRIBUTES} for _ in range(n_entities)]
        vocab = fixed | set(words)
        self.vocab = [PAD, SEP] + sorted(vocab - {PAD, SEP})
        self.index = {w: i for i, w in enumerate(self.vocab)}

    @staticmethod
    def _words(rng: random.Random, n: int, taken: set[str]) -> list[str]:
        """n distinct capitalised pseudo-words of 2-3 syllables, none of them in taken."""
        taken_lower = {w.lower() for w in taken}
        out: dict[str, None] = {}
        while len(out) < n:
            word = "".join(rng.choices(_SYLLABLES, k=rng.choice((2, 3))))
            if word not in taken_lower:
                out[word.capitalize()] = None
        return list(out)

    def encode(self, text: str) -> list[int]:
        """Whitespace-separated words -> token ids."""
        return [self.index[w] for w in text.split()]

    def decode(self, ids: list[int]) -> str:
        return " ".join(self.vocab[i] for i in ids)

    def _question(self, template: str, entity: int, attribute: str) -> tuple[list[int], list[int]]:
        prompt = f"{SEP} Q : {template.format(name=self.names[entity])} A :"
        return self.encode(prompt), self.encode(self.facts[entity][attribute])

    def train_items(self) -> list[list[int]]:
        """Every fact in every statement template and every training question template."""
        items = []
        for e, facts in enumerate(self.facts):
            for a, value in facts.items():
                _, statements, questions = ATTRIBUTES[a]
                for t in statements:
                    items.append(self.encode(f"{SEP} " + t.format(name=self.names[e], value=value)))
                for t in questions[:-1]:
                    prompt, answer = self._question(t, e, a)
                    items.append(prompt + answer)
        return items

    def questions(self, held_out: bool = True) -> list[tuple[list[int], list[int]]]:
        """(prompt ids, answer ids) for every fact, in the held-out (or first training) template."""
        return [
            self._question(ATTRIBUTES[a][2][-1 if held_out else 0], e, a)
            for e in range(len(self.facts))
            for a in ATTRIBUTES
        ]

    def batches(self, batch_size: int, seq_len: int, seed: int = 0) -> Iterator[Tensor]:
        """Endless (batch_size, seq_len + 1) int64 windows of the shuffled training text, epoch by epoch."""
        rng, items, stream = random.Random(seed), self.train_items(), []
        need = batch_size * (seq_len + 1)
        while True:
            rng.shuffle(items)
            for item in items:
                stream.extend(item)
                if len(stream) >= need:
                    yield torch.tensor(stream[:need]).view(batch_size, seq_len + 1)
                    stream = stream[need:]
