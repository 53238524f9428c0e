"""The synthetic factual-recall data: determinism, coverage and the held-out template split."""
import itertools

import torch

from memory_ext.facts import ATTRIBUTES, SEP, FactSet


def test_same_seed_same_data_other_seed_other_data():
    a, b, c = FactSet(200, seed=3), FactSet(200, seed=3), FactSet(200, seed=4)
    assert a.names == b.names and a.facts == b.facts and a.vocab == b.vocab
    assert a.train_items() == b.train_items() and a.questions() == b.questions()
    for x, y in zip(itertools.islice(a.batches(4, 16, seed=1), 30), itertools.islice(b.batches(4, 16, seed=1), 30), strict=True):
        assert torch.equal(x, y)
    assert a.names != c.names
    assert not torch.equal(next(a.batches(4, 16, seed=1)), next(a.batches(4, 16, seed=2)))


def test_entities_and_vocabulary():
    data = FactSet(300, seed=0)
    assert len(set(data.names)) == 300 and len(data.facts) == 300
    assert len(set(data.vocab)) == len(data.vocab) and data.vocab[:2] == ["<pad>", SEP]
    for facts in data.facts:
        assert set(facts) == set(ATTRIBUTES)
        for a, v in facts.items():
            assert ATTRIBUTES[a][0] is None or v in ATTRIBUTES[a][0]
    # generated names never collide with a word of the fixed vocabulary
    generated = {w for n in data.names for w in n.split()}
    fixed = {w for values, s, q in ATTRIBUTES.values() for w in (values or [])} | {"Paris", "In", "The"}
    assert not {w.lower() for w in generated} & {w.lower() for w in fixed}


def test_training_text_holds_every_fact_and_no_held_out_question():
    data = FactSet(50, seed=1)
    text = {data.decode(item) for item in data.train_items()}
    for e, facts in enumerate(data.facts):
        for a, value in facts.items():
            statements, questions = ATTRIBUTES[a][1], ATTRIBUTES[a][2]
            for t in statements:
                assert f"{SEP} " + t.format(name=data.names[e], value=value) in text
            held_out = questions[-1].format(name=data.names[e])
            assert not any(held_out in line for line in text)
    held = data.questions()
    assert len(held) == 50 * len(ATTRIBUTES)
    for (prompt, answer), (e, a) in zip(held, itertools.product(range(50), ATTRIBUTES), strict=True):
        assert data.decode(prompt).endswith("? A :") and data.decode(answer) == data.facts[e][a]
    seen = {tuple(p + a) for p, a in data.questions(held_out=False)}
    assert seen <= {tuple(item) for item in data.train_items()}


def test_batches_are_the_shuffled_items_back_to_back():
    data = FactSet(20, seed=0)
    items = data.train_items()
    n = sum(map(len, items))
    batches = list(itertools.islice(data.batches(2, 15, seed=0), n // 32))  # within the first epoch
    assert all(b.shape == (2, 16) and b.dtype == torch.int64 for b in batches)
    stream = torch.cat([b.flatten() for b in batches]).tolist()
    sep = data.index[SEP]
    starts = [i for i, t in enumerate(stream) if t == sep]
    pieces = [tuple(stream[a:b]) for a, b in itertools.pairwise(starts)]  # complete items only
    remaining = {}
    for item in items:
        remaining[tuple(item)] = remaining.get(tuple(item), 0) + 1
    for piece in pieces:  # each item at most once per epoch
        assert remaining.get(piece, 0) > 0, data.decode(list(piece))
        remaining[piece] -= 1
    assert len(pieces) > 0.9 * len(items) * len(stream) / n
