import pytest

from leanvlm.ops.schedule import default_prune_layers, progressive_keep


def test_keep_follows_the_formula_for_the_llava_onevision_default():
    keeps = [progressive_keep(layer, 14, 22) for layer in range(28)]
    assert keeps[:14] == [1.0] * 14  # layers 0..l1 see every visual token
    assert keeps[14:22] == pytest.approx([1 - i / 8 for i in range(1, 9)])  # 0.875, 0.75, .., 0
    assert keeps[21] == 0.0  # so layer l2 = 22 and later see none
    assert keeps[22:] == [0.0] * 6


def test_keep_is_monotone_and_bounded():
    for l1, l2 in [(0, 1), (13, 21), (2, 30)]:
        keeps = [progressive_keep(layer, l1, l2) for layer in range(40)]
        assert all(0.0 <= k <= 1.0 for k in keeps)
        assert all(a >= b for a, b in zip(keeps, keeps[1:]))


@pytest.mark.parametrize(
    ("layer", "l1", "l2", "message"),
    [
        (-1, 2, 5, "layer=-1"),
        (3, -2, 5, "l1=-2"),
        (3, 2, -5, "l2=-5"),
        (3, 5, 5, "l1=5, l2=5"),
        (3, 6, 5, "l1=6, l2=5"),
    ],
)
def test_keep_rejects_bad_arguments(layer, l1, l2, message):
    with pytest.raises(ValueError, match=message):
        progressive_keep(layer, l1, l2)


def test_default_prune_layers():
    assert default_prune_layers(28) == (14, 22)  # LLaVA-OneVision-7B
    assert default_prune_layers(32) == (13, 21)  # LLaVA-1.5-7B
    assert default_prune_layers(24) == (12, 19)  # round(0.5 L), round(0.79 L)
    assert default_prune_layers(40) == (20, 32)
    assert default_prune_layers(5) == (3, 4)  # half rounds up
    assert default_prune_layers(1) == (0, 1)
    assert default_prune_layers(3) == (2, 3)  # l2 raised above l1


@pytest.mark.parametrize("num_layers", range(1, 129))
def test_default_prune_layers_is_always_usable(num_layers):
    l1, l2 = default_prune_layers(num_layers)
    assert 0 <= l1 < l2 <= num_layers
    progressive_keep(0, l1, l2)  # accepted


def test_default_prune_layers_rejects_empty_models():
    with pytest.raises(ValueError, match="got 0"):
        default_prune_layers(0)


def test_image_window_prunes_later_than_the_video_one():
    assert default_prune_layers(30, "image") == (18, 26)  # the bundled model's measured image window
    assert default_prune_layers(28, "image") == (17, 24)  # published depths keep the SPEC only for video
    assert default_prune_layers(1, "image") == (0, 1)
    for layers in range(4, 129):
        image, video = default_prune_layers(layers, "image"), default_prune_layers(layers, "video")
        assert 0 <= image[0] < image[1] <= layers
        assert image[0] >= video[0] and image[1] >= video[1]
    with pytest.raises(ValueError, match="modality must be 'image' or 'video', got 'audio'"):
        default_prune_layers(30, "audio")


def test_default_merge_keep_per_modality():
    from leanvlm.ops.schedule import default_merge_keep

    assert default_merge_keep("image") == 0.2 and default_merge_keep("video") == 0.25


def test_one_given_bound_fits_every_modality():
    from leanvlm.ops.schedule import prune_window

    assert prune_window(30, "image") == (18, 26) and prune_window(30, "video") == (15, 24)
    assert prune_window(30, "video", l1=25) == (25, 26)  # the video default l2 (24) moves past l1
    assert prune_window(30, "image", l1=10) == (10, 26)  # a default that already fits stays
    assert prune_window(30, "image", l2=12) == (11, 12)
    assert prune_window(30, "video", 3, 5) == (3, 5)
