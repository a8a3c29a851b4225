"""Filter plates and channel activations: the pictures show the model's own numbers."""

import numpy as np
import pytest
import torch

from cnnscope import InputError, filter_plate, layer_activations
from cnnscope.hooks import capture
from cnnscope.render.plates import to_uint8


def test_the_first_layer_is_the_stem_convolution_in_colour(default_model):
    plate = filter_plate(default_model, tile_size=9)
    # the stem conv, not the ReLU6 module it shares with the head
    assert plate.layer == "_conv_stem" and plate.mode == "rgb" and plate.weights.shape == (32, 3, 3, 3)
    kernel = default_model.module._conv_stem.weight.detach()[5].permute(1, 2, 0).numpy()
    factor = 3  # 3x3 kernels enlarged to 9 pixels
    columns = 6  # 32 tiles -> 6 columns
    row, col = divmod(5, columns)
    top, left = row * (3 * factor + 1), col * (3 * factor + 1)
    tile = plate.image[top : top + 9 : factor, left : left + 9 : factor]
    assert np.array_equal(tile, to_uint8(kernel))
    assert int(plate.image[top : top + 9, left : left + 9].max()) == 255  # min-max per kernel


def test_deeper_convolutions_in_grey(default_model):
    depthwise = filter_plate(default_model, "_blocks.5._depthwise_conv")
    assert depthwise.mode == "mean" and depthwise.shown == 240 and depthwise.weights.shape == (240, 1, 3, 3)
    grid = filter_plate(default_model, "_blocks.3._project_conv", mode="channels", max_filters=4, max_inputs=10)
    assert grid.shown == 4
    # one row of 10 tiles per filter; 1x1 kernels enlarged to 32 pixels, 1-pixel gaps
    assert grid.image.shape[:2] == (4 * 32 + 3, 10 * 32 + 9)
    with pytest.raises(InputError, match="not a Conv2d"):
        filter_plate(default_model, "_bn0")
    with pytest.raises(InputError, match="colour tiles need 3"):
        filter_plate(default_model, "_blocks.5._depthwise_conv", mode="rgb")


def test_activations_are_the_layer_output_sorted_by_mean(default_model, chelsea):
    result = layer_activations(default_model, chelsea, "_blocks.10")
    ref = default_model.layer("_blocks.10")
    with torch.no_grad(), capture(default_model.module, [ref]) as record:
        default_model.module(default_model.preprocess([chelsea]))
    expected = record["_blocks.10"][0].numpy()
    np.testing.assert_allclose(result.maps, expected, rtol=1e-5, atol=1e-6)
    means = expected.mean(axis=(1, 2))
    assert result.strongest == int(means.argmax())
    assert np.all(np.diff(result.means[result.order]) <= 0)
    assert [c for c, _ in result.top(3)] == list(np.argsort(-means)[:3])
    overlay = result.overlay()
    assert overlay.shape == chelsea.shape and not np.array_equal(overlay, chelsea)
    assert result.mosaic().shape[2] == 3
    with pytest.raises(InputError, match="not a feature map"):
        layer_activations(default_model, chelsea, "_fc")


def test_pictures_leave_the_model_as_it_was(default_model, chelsea):
    from cnnscope import architecture
    from cnnscope.testing import check_untouched

    check_untouched(lambda: filter_plate(default_model, "_blocks.3._project_conv", mode="channels"), default_model)
    check_untouched(lambda: layer_activations(default_model, chelsea, "_swish@0"), default_model)
    check_untouched(lambda: architecture(default_model), default_model)
