"""The newer CAM variants against hand computations on the tiny model's layers."""

import numpy as np
import pytest
import torch

import cnnscope
from cnnscope.testing import tiny_model

IMAGES = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))


def activations_and_gradients(model, layer_name: str, targets: torch.Tensor):
    """The layer's output and each target logit's gradient there, by a plain forward hook and autograd."""
    module = dict(model.module.named_modules())[layer_name]
    seen = {}
    handle = module.register_forward_hook(lambda m, i, o: seen.__setitem__("a", o))
    try:
        logits = model.module(IMAGES)
    finally:
        handle.remove()
    grads = []
    for k in range(targets.shape[1]):
        score = logits.gather(1, targets[:, k : k + 1]).sum()
        (grad,) = torch.autograd.grad(score, seen["a"], retain_graph=True)
        grads.append(grad)
    return seen["a"].detach(), torch.stack(grads, dim=1)


@pytest.mark.parametrize("layer", ["conv2", "act3"])
def test_gradcam_elementwise_is_the_sum_of_positive_gradient_x_activation(layer):
    model = tiny_model()
    ours = cnnscope.get_method("gradcam-elementwise")(model, layer=layer)(IMAGES, "top2")
    acts, grads = activations_and_gradients(model, layer, ours.targets)
    expected = torch.relu(grads * acts.unsqueeze(1)).sum(dim=2)
    torch.testing.assert_close(ours.raw, expected, rtol=1e-5, atol=1e-7)


def test_eigengradcam_is_the_first_principal_component_of_gradient_x_activation():
    model = tiny_model()
    ours = cnnscope.get_method("eigengradcam")(model, layer="conv2", relu=False)(IMAGES, "top2")
    acts, grads = activations_and_gradients(model, "conv2", ours.targets)
    for b in range(2):
        for k in range(2):
            product = (grads[b, k] * acts[b]).flatten(1).T.double().numpy()  # (hw, C)
            centred = product - product.mean(axis=0)
            _, _, vt = np.linalg.svd(centred, full_matrices=True)  # pytorch-grad-cam's get_2d_projection
            projection = centred @ vt[0]
            if np.corrcoef(projection, product.sum(axis=1))[0, 1] < 0:
                projection = -projection  # our sign convention: along the grad x activation evidence
            torch.testing.assert_close(
                ours.raw[b, k].flatten().double(), torch.from_numpy(projection), rtol=1e-4, atol=1e-6
            )


def test_finercam_is_gradcam_of_the_target_minus_its_most_similar_classes():
    model = tiny_model()
    ours = cnnscope.get_method("finercam")(model, layer="conv3", relu=False, alpha=0.5, compared=2)(IMAGES, "top1")
    module = dict(model.module.named_modules())["conv3"]
    seen = {}
    handle = module.register_forward_hook(lambda m, i, o: seen.__setitem__("a", o))
    try:
        logits = model.module(IMAGES)
    finally:
        handle.remove()
    for b in range(2):
        row = logits[b]
        target = int(ours.targets[b, 0])
        order = [int(j) for j in (row.detach() - row[target].detach()).abs().argsort() if int(j) != target][:2]
        p = torch.softmax(row, dim=0)
        score = sum(p[j] * (row[target] - 0.5 * row[j]) for j in order) / (sum(p[j] for j in order) + 1e-9)
        (grad,) = torch.autograd.grad(score, seen["a"], retain_graph=True)
        weights = grad[b].mean(dim=(1, 2))
        expected = (weights[:, None, None] * seen["a"][b].detach()).sum(dim=0)
        torch.testing.assert_close(ours.raw[b, 0], expected, rtol=1e-4, atol=1e-6)
