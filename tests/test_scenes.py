"""The generated scenes (real_model/data.py): `every_question=True` adds questions to the same images, and
every position answer is true of the pixels (object centres found from the image, not the generator)."""

import numpy as np

from leanvlm.real_model.data import COLORS, scene_objects, scenes


def _centre(image, rgb, tol=30):
    """(x, y) centre of the pixels within `tol` of colour `rgb`."""
    ys, xs = np.nonzero(np.abs(np.asarray(image, dtype=int) - np.array(rgb)).max(-1) < tol)
    return xs.mean(), ys.mean()


def test_every_question_keeps_images_and_default_questions_first():
    plain, every = scenes("train", 30, 5), scenes("train", 30, 5, every_question=True)
    by_key = {}
    for item in every:
        by_key.setdefault(item.image_key, []).append(item)
    for key, rows in by_key.items():
        default = [i for i in plain if i.image_key == key]
        assert [(i.question, i.answer) for i in rows[: len(default)]] == [(i.question, i.answer) for i in default]
        assert np.array_equal(np.asarray(rows[0].image), np.asarray(default[0].image))
        questions = [i.question for i in rows]
        assert len(questions) == len(set(questions)), key
    assert sum(i.qtype == "position" for i in every) > 5 * sum(i.qtype == "position" for i in plain)


def test_position_answers_match_the_pixels():
    for item in (i for i in scenes("heldout", 25, 3, every_question=True) if i.qtype == "position"):
        words = item.question.split()
        a, b = words[2], words[-2]
        (ax, ay), (bx, by) = _centre(item.image, COLORS[a]), _centre(item.image, COLORS[b])
        truth = ax < bx if "left" in item.question else ay < by
        assert item.answer == ("yes" if truth else "no"), item.question


def test_scene_objects_are_the_scenes_images_with_their_shapes():
    items = scenes("heldout", 12, 4)
    layouts = scene_objects("heldout", 12, 4)
    first = {}
    for item in items:
        first.setdefault(item.image_key, item)
    assert len(layouts) == len(first) == 12
    for (image, objects), item in zip(layouts, first.values()):
        assert np.array_equal(np.asarray(image), np.asarray(item.image))
        assert item.question == "how many shapes are there?" and item.answer == str(len(objects))
        for color, _, x, y in objects:  # each object's colour is drawn around its centre (a triangle's
            cx, cy = _centre(image, COLORS[color])  # centroid sits up to 0.3 r = 5.4 px below it)
            assert abs(cx - x) < 6 and abs(cy - y) < 6, (color, x, y, cx, cy)
