"""The method contract from a user's side: a new CAM variant and a new perturbation method, each a
few lines on its family's one override point, pass the shipped contract checks and are listed with
their typed options."""

from typing import ClassVar

import pytest
import torch

import cnnscope
from cnnscope._registry import METHODS
from cnnscope.cli import main
from cnnscope.methods import method_listing, register_method
from cnnscope.methods.cam import CAMBase
from cnnscope.methods.perturbation import PerturbationMethod
from cnnscope.options import Options, integer, number
from cnnscope.testing import check_method, quadrant_model, tiny_model


@pytest.fixture
def registered():
    names = []

    def register(name, cls):
        register_method(name)(cls)
        names.append(name)
        return cls

    yield register
    for name in names:
        METHODS.unregister(name)


def test_a_gradient_free_cam_variant_in_a_few_lines(registered, capsys):
    class MeanChannel(CAMBase):  # the lines a user writes: 7
        """Every channel weighted by its own spatial mean raised to ``power``, class-agnostic."""

        summary = "channels weighted by their mean activation"
        needs_gradients = False
        class_specific = False
        options: ClassVar[Options] = CAMBase.options.without("counterfactual") | Options(
            power=number(1.0, "exponent of the channel means", low=0, high=4)
        )

        def weights(self, activations, gradients, targets, run):
            means = activations.mean(dim=(2, 3)).clamp_min(0) ** self.config["power"]
            return means.unsqueeze(1).expand(-1, targets.shape[1], -1)

    registered("test-mean-channel", MeanChannel)
    model = tiny_model()
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    check_method(cnnscope.get_method("test-mean-channel"), model, images, target="top2", power=2)
    # the map is what the formula says, at the default layer
    explanation = MeanChannel(model, power=1)(images[:1], 0)
    with torch.no_grad():
        from cnnscope.hooks import capture

        with capture(model.module, [explanation_layer := model.default_layer()]) as record:
            model.module(images[:1])
    acts = record[explanation_layer.key][0]
    expected = torch.relu((acts.mean(dim=(1, 2)).clamp_min(0)[:, None, None] * acts).sum(0))
    torch.testing.assert_close(explanation.raw[0, 0], expected)
    listed = {row["name"]: row for row in method_listing()}
    assert listed["test-mean-channel"]["options"]["power"]["range"] == "a number >= 0 and <= 4"
    with pytest.raises(SystemExit) as info:
        main(["methods", "test-mean-channel", "--json"])
    assert info.value.code == 0 and '"power"' in capsys.readouterr().out
    with pytest.raises(cnnscope.MethodError, match="option power of test-mean-channel takes a number >= 0"):
        MeanChannel(model, power=-1)


def test_a_perturbation_method_in_a_few_lines(registered):
    class Bands(PerturbationMethod):  # the lines a user writes: 17
        """Blank one horizontal band at a time; each band's pixels get the score drop."""

        summary = "score drop per blanked horizontal band"
        options: ClassVar[Options] = PerturbationMethod.options | Options(
            bands=integer(4, "horizontal bands", low=1, high=64)
        )

        def start(self, run):
            run.total = int(self.config["bands"])
            run.state["edges"] = torch.linspace(0, run.image.shape[-2], run.total + 1).long().tolist()
            run.maps = torch.zeros((len(run.targets), *run.image.shape[-2:]))

        def make(self, run, start, stop):
            edges, blanked = run.state["edges"], run.image.repeat(stop - start, 1, 1, 1)
            for row, band in enumerate(range(start, stop)):
                blanked[row, :, edges[band] : edges[band + 1]] = 0
            return blanked

        def take(self, run, start, scores):
            edges = run.state["edges"]
            for row, drop in enumerate(run.base - run.picked(scores)):
                run.maps[:, edges[start + row] : edges[start + row + 1]] = drop[:, None, None]

        def finish(self, run):
            pass

    registered("test-bands", Bands)
    model = quadrant_model()
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    check_method(cnnscope.get_method("test-bands"), model, images, target="top1", bands=8, quiet=True)
    # evidence in the bottom-left quadrant: only the bottom bands matter for that class
    image = torch.zeros(1, 3, 32, 32)
    image[:, :, 16:, :16] = 1.0
    explanation = Bands(model, bands=2, quiet=True)(image, "bottom-left")
    assert explanation.raw[0, 0, 16:].min() > 0 and explanation.raw[0, 0, :16].abs().max() == 0
    assert "bands" in {row["name"]: row for row in method_listing()}["test-bands"]["options"]
