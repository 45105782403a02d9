"""The generated clips (real_model/clips.py): deterministic, split-separated, and every answer true of
the pixels (checked from the frames, independently of the generator's bookkeeping)."""

import json

import numpy as np
import pytest

import dataclasses

from leanvlm.real_model.clips import (CLIP_ANSWERS, CLIP_QUESTION_TYPES, FRAMES, FRAME_SIZE, _every_question,
                                    _make_objects, clips, played_backwards)
from leanvlm.real_model.data import COLORS


def _by_clip(items):
    out = {}
    for item in items:
        out.setdefault(item.clip_key, []).append(item)
    return out


def _mask(frame, rgb, tol=30):
    """[H, W] bool: pixels within `tol` of colour `rgb` (anti-aliased edges excluded)."""
    return (np.abs(np.asarray(frame, dtype=int) - np.array(rgb)).max(-1) < tol)


def test_deterministic_and_splits_share_no_clip():
    a, b = clips("test", 6, 3), clips("test", 6, 3)
    assert [(i.question, i.answer) for i in a] == [(i.question, i.answer) for i in b]
    assert all(np.array_equal(np.asarray(x.frames[4]), np.asarray(y.frames[4])) for x, y in zip(a, b))
    train = {np.asarray(i.frames[0]).tobytes() for i in clips("train", 20, 3)}
    assert not train & {np.asarray(i.frames[0]).tobytes() for i in clips("test", 20, 3)}


def test_shapes_of_a_clip():
    items = clips("heldout", 30, 1)
    assert {i.qtype for i in items} == set(CLIP_QUESTION_TYPES)
    for group in _by_clip(items).values():
        assert len(group) == 5 and len({id(i.frames) for i in group}) == 1
        assert len(group[0].frames) == FRAMES and group[0].frames[0].size == (FRAME_SIZE, FRAME_SIZE)
    assert all(i.answer in CLIP_ANSWERS for i in items)


def test_count_answers_match_the_pixels():
    for item in (i for i in clips("heldout", 40, 2) if i.qtype == "count"):
        color = item.question.split("show a ")[1].split(" shape")[0]
        shown = sum(_mask(f, COLORS[color]).sum() > 30 for f in item.frames)
        assert str(shown) == item.answer, item.question


def test_direction_answers_match_the_pixels():
    for item in (i for i in clips("heldout", 40, 4) if i.qtype == "direction"):
        band = [np.asarray(f, dtype=int)[40:72] for f in item.frames]  # the mover's band (y 56 +- 16)
        background = band[0][0, 0]
        xs = [np.nonzero((np.abs(b - background).max(-1) > 60).any(0))[0] for b in band]
        centres = [x.mean() for x in xs if len(x)]
        assert len(centres) >= 2
        assert item.answer == ("right" if centres[-1] > centres[0] else "left"), item.question


def test_yes_and_no_both_occur_and_answers_are_varied():
    items = clips("train", 200, 0)
    presence = [i.answer for i in items if i.qtype == "presence"]
    assert 0.3 < presence.count("no") / len(presence) < 0.7
    directions = [i.answer for i in items if i.qtype == "direction"]
    assert 0.35 < directions.count("left") / len(directions) < 0.65


def test_played_backwards_answers_what_the_reversed_clip_shows():
    # Reverse the objects themselves (visible interval mirrored, per-frame colours and positions reversed)
    # and ask the generator's own questions of them: every row but order must equal played_backwards'.
    rng = np.random.default_rng(5)
    flips = set()
    for _ in range(50):
        objects = _make_objects(rng)
        backwards = [dataclasses.replace(o, first=FRAMES - 1 - o.last, last=FRAMES - 1 - o.first,
                                         colors=o.colors[::-1], xs=o.xs[::-1]) for o in objects]
        expected = [row for row in _every_question(backwards) if row[2] != "order"]
        got = played_backwards(_every_question(objects))
        assert sorted(got) == sorted(expected)
        flips |= {answer for _, answer, qtype in got if qtype == "direction"}
    assert flips == {"left", "right"}


def test_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        clips("validation", 3)
    with pytest.raises(ValueError, match="n must be"):
        clips("test", 0)


def test_clip_dir_reads_frame_folders_and_gifs(tmp_path):
    from leanvlm.hub import load_video
    from leanvlm.real_model.clips import load_clip_dir

    source = clips("heldout", 2, 5)
    first, second = source[0], source[5]
    (tmp_path / "videos" / "0").mkdir(parents=True)
    for t, frame in enumerate(first.frames):
        frame.save(tmp_path / "videos" / "0" / f"{t:03d}.png")
    second.frames[0].save(tmp_path / "videos" / "1.gif", save_all=True, append_images=list(second.frames[1:]))
    rows = [[first.question, first.answer, 0], [second.question, second.answer, 1], ["which way?", "left", 1]]
    (tmp_path / "questions.json").write_text(json.dumps(rows))
    items = load_clip_dir(str(tmp_path), load_video)
    assert [(i.question, i.answer) for i in items] == [tuple(r[:2]) for r in rows]
    assert items[2].qtype == "direction" and items[1].clip_key == items[2].clip_key == "1"
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(items[0].frames, first.frames))
    assert 1 <= len(items[1].frames) <= FRAMES  # a GIF writer may merge identical consecutive frames
    rows.append(["?", "yes", 9])
    (tmp_path / "questions.json").write_text(json.dumps(rows))
    with pytest.raises(ValueError, match="row 3 needs clip 9"):
        load_clip_dir(str(tmp_path), load_video)
