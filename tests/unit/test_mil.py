"""Attention MIL learns where the object is from image labels alone."""

import pytest
import torch

from cnnscope.data import make_shapes
from cnnscope.errors import InputError
from cnnscope.mil import AttentionMIL, patchify, to_tensor, train_attention_mil


def test_patchify_keeps_pixels_in_row_order():
    images = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    patches = patchify(images, 2)
    assert patches.shape == (2, 4, 3, 2, 2)
    assert torch.equal(patches[1, 1], images[1, :, 0:2, 2:4]) and torch.equal(patches[0, 2], images[0, :, 2:4, 0:2])
    with pytest.raises(InputError, match="multiple of the patch size"):
        patchify(torch.zeros(1, 3, 5, 4), 2)


@pytest.mark.slow
def test_attention_localises_the_object_after_training_on_labels_only():
    classes = ("circle", "cross")
    train = make_shapes(400, size=64, seed=0, classes=classes)
    test = make_shapes(100, size=64, seed=1, classes=classes)
    model, history = train_attention_mil(train.images, train.labels, classes=2, epochs=25, lr=2e-3)
    assert history.losses[-1] < 0.6 * history.losses[0]
    images = to_tensor(test.images)
    with torch.no_grad():
        logits, attention = model(images)
    assert float((logits.argmax(1).numpy() == test.labels).mean()) > 0.7
    assert torch.allclose(attention.sum(dim=1), torch.ones(100))
    maps = model.attention_map(images).numpy()
    share = ((maps * test.masks).sum(axis=(1, 2)) / maps.sum(axis=(1, 2))).mean()
    area = test.masks.mean()
    assert share > 1.5 * area  # measured: 0.38 of the attention on 0.17 of the image


def test_attention_map_shape():
    model = AttentionMIL(classes=3, patch=8).eval()
    maps = model.attention_map(torch.rand(2, 3, 32, 32))
    assert maps.shape == (2, 32, 32)
    assert torch.allclose(maps[:, ::8, ::8].sum(dim=(1, 2)), torch.ones(2))
