"""Methods on real architectures (random weights, seeded, 64x64 inputs): the contract checks of
cnnscope.testing, Grad-CAM and gradients against a hand computation and against Captum, and guided backprop
naming the squeeze-excitation gates it leaves on their plain gradient."""

from __future__ import annotations

import re
import warnings

import pytest
import torch

pytest.importorskip("torchvision", reason="zoo tests run in .venv-zoo: make test-zoo")
pytest.importorskip("timm", reason="zoo tests run in .venv-zoo: make test-zoo")
captum_attr = pytest.importorskip("captum.attr")

import cnnscope  # noqa: E402
from cnnscope.errors import CnnscopeWarning  # noqa: E402
from cnnscope.testing import check_method  # noqa: E402

from .archs import METHOD_ARCHS, REPRESENTATIVE, SE_GATES, SMALL_ARCHS, images, small  # noqa: E402

#: Cheap settings: the contract does not depend on them.
CHEAP = {"ig": {"steps": 4}, "occlusion": {"window": 32, "stride": 32}}


def _check(method: str, name: str) -> list[str]:
    """check_method on two images; returns the notes (CnnscopeWarnings) it raised; any other warning fails."""
    model = small(name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_method(cnnscope.get_method(method), model, images(model), **CHEAP.get(method, {}))
    notes = [  # random weights can give two top classes the same map; the method says so, rightly
        str(w.message)
        for w in caught
        if issubclass(w.category, CnnscopeWarning) and "nearly identical" not in str(w.message)
    ]
    others = [w for w in caught if not issubclass(w.category, (CnnscopeWarning, DeprecationWarning))]
    assert not others, [str(w.message) for w in others]
    return notes


@pytest.mark.slow
@pytest.mark.parametrize("method", ["gradcam", "eigencam", "guided-backprop"])
@pytest.mark.parametrize("name", METHOD_ARCHS)
def test_contract(name, method):
    _check(method, name)  # notes about a random model's maps (empty, constant) are allowed: they are right


@pytest.mark.slow
@pytest.mark.parametrize("method", ["gradcam++", "ig", "occlusion"])
@pytest.mark.parametrize("name", REPRESENTATIVE)
def test_contract_of_the_other_methods_on_one_arch_per_family(name, method):
    _check(method, name)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["scorecam", "ablationcam"])
@pytest.mark.parametrize("name", SMALL_ARCHS)
def test_contract_of_the_costly_cams_on_small_archs(name, method):
    _check(method, name)


@pytest.mark.parametrize("name", list(SE_GATES))
def test_guided_backprop_names_the_squeeze_excitation_gates(name):
    kind, module = SE_GATES[name]
    model = small(name)
    with pytest.warns(CnnscopeWarning) as caught:
        cnnscope.get_method("guided-backprop")(model)(images(model), "top1")
    gate_notes = [str(w.message) for w in caught if "plain gradient" in str(w.message)]
    assert gate_notes, [str(w.message) for w in caught]
    note = gate_notes[0]
    assert kind in note
    assert f".{module}'" in note  # the gate modules are named, e.g. 'features.1.0.block.1.scale_activation'
    # every named place is a gate module of the model
    named = dict(model.module.named_modules())
    places = re.findall(r"'([^']+)'", note)
    assert places and all(type(named[place]).__name__.lower() == kind for place in places), places


def _hand_gradcam(model, layer, batch, targets):
    """Grad-CAM by hand: capture the layer's output with a plain forward hook (a clone passes on, so an in-place
    op after the layer, DenseNet's ReLU, cannot change it), autograd to it, ReLU(sum_c w_c A_c). Also returns
    the size of the terms, max over pixels of sum_c |w_c A_c|: the scale of float32 rounding in the sum."""
    module = dict(model.module.named_modules())[layer.name]
    seen = []

    def keep(module, args, output):
        seen.append(output)
        return output.clone()

    handle = module.register_forward_hook(keep)
    try:
        with torch.enable_grad():
            logits = model.module(batch)
            activation = seen[layer.call]
            grads = torch.autograd.grad(logits.gather(1, targets[:, None]).sum(), activation)[0]
    finally:
        handle.remove()
    activation, grads = layer.layout.to_map(activation.detach()), layer.layout.to_map(grads)
    terms = grads.mean(dim=(2, 3), keepdim=True) * activation
    return torch.relu(terms.sum(dim=1)), float(terms.abs().sum(dim=1).max())


@pytest.mark.filterwarnings("ignore::cnnscope.CnnscopeWarning")  # notes on a random model's maps
@pytest.mark.parametrize("name", METHOD_ARCHS)
def test_gradcam_and_gradients_equal_a_hand_computation(name):
    model = small(name)
    batch = images(model)
    with torch.no_grad():
        targets = model(batch).argmax(dim=1)
    explanation = cnnscope.get_method("gradcam")(model)(batch, targets[:, None].tolist())
    expected, scale = _hand_gradcam(model, model.default_layer(), batch, targets)
    torch.testing.assert_close(explanation.raw[:, 0], expected, rtol=1e-4, atol=1e-4 * scale)
    inputs = batch.clone().requires_grad_(True)
    (grads,) = torch.autograd.grad(model.module(inputs).gather(1, targets[:, None]).sum(), inputs)
    saliency = cnnscope.get_method("saliency")(model)(batch, targets[:, None].tolist())
    torch.testing.assert_close(saliency.channels[:, 0], grads, rtol=1e-4, atol=1e-4 * float(grads.abs().max()))


CNNS = [name for name in METHOD_ARCHS if "vit" not in name and "swin" not in name and "deit" not in name]


@pytest.mark.filterwarnings("ignore:Input Tensor 0 did not already require gradients:UserWarning")  # Captum's
@pytest.mark.filterwarnings("ignore::cnnscope.CnnscopeWarning")  # notes on a random model's maps
@pytest.mark.parametrize("name", CNNS)
def test_gradcam_and_saliency_agree_with_captum(name):
    """Captum's LayerGradCam on the default layer (a module called once) and its Saliency(abs=False)."""
    model = small(name)
    batch = images(model)
    with torch.no_grad():
        targets = model(batch).argmax(dim=1).tolist()
    ref = model.default_layer()
    assert ref.calls == 1
    ours = cnnscope.get_method("gradcam")(model, relu=False)(batch, [[t] for t in targets])
    theirs = captum_attr.LayerGradCam(model.module, ref.module).attribute(batch, target=targets).detach()[:, 0]
    torch.testing.assert_close(ours.raw[:, 0], theirs, rtol=1e-4, atol=1e-4 * float(theirs.abs().max()))
    mine = cnnscope.get_method("saliency")(model)(batch, [[t] for t in targets]).channels[:, 0]
    captum = captum_attr.Saliency(model.module).attribute(batch.clone(), target=targets, abs=False).detach()
    torch.testing.assert_close(mine, captum, rtol=1e-4, atol=1e-4 * float(captum.abs().max()))
