"""Deep Dream: the chosen channels grow, a seed repeats the run, the model is left alone."""

import numpy as np
import pytest

from cnnscope import InputError, deep_dream, layer_activations
from cnnscope.features.dream import parse_channels
from cnnscope.testing import check_untouched


def test_dream_raises_the_chosen_channels(default_model, chelsea):
    result = deep_dream(default_model, chelsea, "_blocks.8", "0-3", octaves=2, iterations=4, seed=0, quiet=True)
    assert result.images.shape == (4, *chelsea.shape) and result.layer == "_blocks.8"
    assert result.channels == [[0], [1], [2], [3]]
    assert all(after > before + 0.5 for before, after in zip(result.before, result.after, strict=True))
    # checked independently, on the model's own 224x224 view of the photo and of each dream
    photo = layer_activations(default_model, chelsea, "_blocks.8").means
    for index, dreamed in enumerate(result.images):
        assert layer_activations(default_model, dreamed, "_blocks.8").means[index] > photo[index]


def test_together_and_whole_layer_give_one_image(default_model, chelsea):
    together = deep_dream(default_model, chelsea, "_blocks.5", [3, 9], together=True, octaves=1, iterations=2)
    whole = deep_dream(default_model, chelsea, "_blocks.5", None, octaves=1, iterations=2)
    assert together.images.shape[0] == 1 and together.channels == [[3, 9]]
    assert whole.images.shape[0] == 1 and whole.channels == [[]]
    assert together.after[0] > together.before[0] and whole.after[0] > whole.before[0]
    assert together.captions() == [f"ch 3,9: {together.before[0]:.2f} -> {together.after[0]:.2f}"]
    assert together._repr_png_()[:4] == b"\x89PNG"


def test_a_seed_repeats_the_dream_and_the_model_is_untouched(default_model, chelsea):
    def run(seed):
        return deep_dream(default_model, chelsea, "_blocks.3", [1, 2], octaves=2, iterations=2, seed=seed)

    first = check_untouched(lambda: run(5), default_model)
    assert np.array_equal(first.images, run(5).images)
    assert not np.array_equal(first.images, run(6).images)


def test_channel_lists():
    assert parse_channels("0-3,10") == [0, 1, 2, 3, 10]
    assert parse_channels([4, 5]) == [4, 5] and parse_channels(None) is None
    with pytest.raises(InputError, match="runs backwards"):
        parse_channels("5-2")
    with pytest.raises(InputError, match="0-24 or 3,5,7"):
        parse_channels("a-b")


def test_bad_dream_input(default_model, chelsea):
    with pytest.raises(InputError, match="has 40 channels"):
        deep_dream(default_model, chelsea, "_blocks.3", "38-41", iterations=1)
    with pytest.raises(InputError, match="octave_scale > 1"):
        deep_dream(default_model, chelsea, "_blocks.3", "1", octave_scale=1.0)


def test_models_with_a_fixed_input_size_are_told_why():
    from cnnscope import ModelError
    from cnnscope.testing.models import tiny_vit

    vit = tiny_vit()
    photo = (np.random.default_rng(0).random((40, 60, 3)) * 255).astype(np.uint8)
    with pytest.raises(ModelError, match="fixed input size"):
        deep_dream(vit, photo, vit.default_layer().key, "0-1", octaves=2, iterations=1)


def test_nothing_is_left_behind_when_the_forward_fails(default_model, chelsea):
    from cnnscope import ModelError
    from cnnscope.testing import Snapshot

    before = Snapshot.take(default_model.module)
    calls = {"n": 0}

    def fail_later(module, args, output):
        calls["n"] += 1
        if calls["n"] == 3:  # after two successful passes, in the middle of the ascent
            raise RuntimeError("injected failure")

    handle = default_model.module._blocks[3].register_forward_hook(fail_later)
    try:
        with pytest.raises(ModelError, match="injected failure"):
            deep_dream(default_model, chelsea, "_blocks.3", "0-1", octaves=2, iterations=3)
    finally:
        handle.remove()
    assert not before.differences(Snapshot.take(default_model.module))
