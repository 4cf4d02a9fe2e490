"""The procedural scene generator: seeded, train and test seeds apart, the held-out colour x shape
pair absent from training scenes, the pictures drawn where the objects are, and the questions'
answers true of the objects."""

from collections import Counter

import numpy as np
import pytest

from pocketlm.data import scenes as S


def test_a_seed_is_one_scene():
    a, b = S.scene(7), S.scene(7)
    assert a.things == b.things and np.array_equal(a.image, b.image)
    assert a.image.shape == (S.SIZE, S.SIZE, 3) and a.image.dtype == np.uint8
    assert S.scene(8).things != a.things
    with pytest.raises(ValueError, match="scene seed -1"):
        S.scene(-1)


def test_the_held_out_pair_is_only_in_test_scenes():
    train = [S.scene(seed) for seed in range(400)]
    test = [S.scene(S.TEST_SEEDS.start + seed) for seed in range(400)]
    assert not any(s.has_held_out for s in train)
    assert sum(s.has_held_out for s in test) > 10
    for s in train + test:
        assert 1 <= len(s.things) <= S.MAX_OBJECTS
        assert len({(t.row, t.col) for t in s.things}) == len(s.things)  # one object a cell
        assert len({t.name for t in s.things}) == len(s.things)  # "the red circle" is one object


def test_the_picture_has_each_object_in_its_colour_where_it_sits():
    s = S.scene(3)
    cell = S.SIZE // S.GRID
    for t in s.things:
        centre = s.image[int((t.row + 0.5) * cell), int((t.col + 0.5) * cell)]
        assert np.abs(centre.astype(int) - S.COLOURS[t.colour]).max() < 40, t
    empty = {(r, c) for r in range(S.GRID) for c in range(S.GRID)} - {(t.row, t.col) for t in s.things}
    for r, c in empty:
        assert s.image[r * cell:(r + 1) * cell, c * cell:(c + 1) * cell].max() < 30


def test_the_answers_are_true_of_the_objects():
    kinds, counts = Counter(), Counter()
    for seed in range(300):
        s = S.scene(seed)
        by_name = {t.name: t for t in s.things}
        for q in S.questions(s):
            kinds[q.kind] += 1
            words = q.text.rstrip("?").split()
            if q.text.startswith("How many"):
                counts[q.answer] += 1
                what = words[2].removesuffix("s")
                want = sum(t.shape == what or t.colour == what for t in s.things)
                assert q.answer == str(want), q
            elif " left of " in q.text or " above " in q.text:
                rel = "left of" if " left of " in q.text else "above"
                a, b = (by_name[n.strip().removeprefix("the ")] for n in q.text[3:-1].split(f" {rel} "))
                truth = a.col < b.col if rel == "left of" else a.row < b.row
                assert q.answer == ("yes" if truth else "no"), q
            elif "small or large" in q.text:
                assert by_name[" ".join(words[2:4])].size == q.answer
            elif q.text.startswith("What shape"):
                assert [t.shape for t in s.things if t.colour == words[4]] == [q.answer]
            elif q.text.startswith("What colour is the object nearest"):
                a = by_name[" ".join(words[-2:])]
                d = sorted(((t.row - a.row) ** 2 + (t.col - a.col) ** 2, t.colour) for t in s.things if t is not a)
                assert d[0][1] == q.answer and (len(d) == 1 or d[0][0] < d[1][0])
            else:
                assert [t.colour for t in s.things if t.shape == words[-1]] == [q.answer]
    assert kinds["attribute"] == 300 and kinds["count"] == 300 and kinds["relation"] > 200
    assert {"0", "1", "2", "3"} <= set(counts)


def test_answer_reads_every_template_off_the_objects():
    asked = Counter()
    for seed in range(300):
        s = S.scene(seed)
        for q in S.questions(s, seed=seed + 7):
            asked[q.text.split()[0] + " " + q.text.split()[1]] += 1
            assert S.answer(q.text, s.things) == q.answer, q
        lost = s.things[1:]  # a decoded scene that missed an object: its questions may have no answer
        for q in S.questions(s):
            if s.things[0].name in q.text and q.kind != "count":
                assert S.answer(q.text, lost) is None, q
    assert set(asked) == {"What shape", "What colour", "Is the", "How many"}
    with pytest.raises(ValueError, match="not one of the scene question templates"):
        S.answer("Is it raining?", S.scene(1).things)


def test_questions_about_the_held_out_pair_exist_only_in_test_scenes():
    about = [q for i in range(400) for s in [S.scene(S.TEST_SEEDS.start + i)] for q in S.questions(s) if S.about_held_out(q, s)]
    assert len(about) > 20 and any("blue triangle" in q.text for q in about)
    assert not any(S.about_held_out(q, s) for s in map(S.scene, range(200)) for q in S.questions(s))
