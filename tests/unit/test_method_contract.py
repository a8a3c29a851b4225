"""The method contract's shared parts: scores from the unperturbed forward, layouts, target text, warnings."""

import pytest
import torch
from torch import nn

import cnnscope
from cnnscope.targets import parse_target_text, resolve_targets
from cnnscope.testing import quadrant_model, tiny_model
from cnnscope.tokens import Layout


def test_occlusion_on_a_multilabel_model_reports_the_models_sigmoid():
    """The defect: perturbation methods passed probabilities where logits were expected, so a multi-label
    model's reported probabilities were softmax(log sigmoid) and 'positive' picked other classes."""
    model = tiny_model(multilabel=True)
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        sigmoid = torch.sigmoid(model.module(images))
    occlusion = cnnscope.get_method("occlusion")(model, window=16, stride=16, quiet=True)
    explanation = occlusion(images, "positive", threshold=0.01)
    torch.testing.assert_close(explanation.probabilities, sigmoid, rtol=1e-4, atol=1e-6)
    gradcam = cnnscope.get_method("gradcam")(model)(images, "positive", threshold=0.01)
    assert torch.equal(explanation.targets, gradcam.targets)
    assert (explanation.targets >= 0).sum(dim=1).tolist() == [3, 2, 3]  # per-image counts differ


def test_a_probability_output_model_reports_its_outputs_as_probabilities():
    model = tiny_model(outputs="probabilities")
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        outputs = model.module(images)
    for name in ("occlusion", "rise", "lime", "patches", "gradcam", "saliency"):
        explanation = cnnscope.get_method(name)(
            model, **({"quiet": True} if name != "gradcam" and name != "saliency" else {})
        )(images, "top1")
        torch.testing.assert_close(explanation.probabilities, outputs, msg=name)
        assert explanation.probability(0, 0) > 0.1, name


def test_faithfulness_reads_the_models_own_probabilities():
    from cnnscope.evaluate import remove_evidence

    model = tiny_model(multilabel=True)
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    result = remove_evidence(model, image, torch.rand(32, 32), 2, fraction=0.1)
    with torch.no_grad():
        assert result["probability_before"] == pytest.approx(float(torch.sigmoid(model.module(image))[0, 2]), rel=1e-5)


def test_a_blank_image_gets_a_constant_map_warning():
    model = quadrant_model()
    blank = torch.zeros(1, 3, 32, 32)
    for name, options in (
        ("occlusion", {"window": 8, "stride": 8, "fill": "zero"}),
        ("rise", {"masks": 20}),
        ("lime", {"samples": 20, "segments": 4, "fill": "zero"}),
    ):
        with pytest.warns(cnnscope.CnnscopeWarning, match="is constant: its score never moved"):
            cnnscope.get_method(name)(model, quiet=True, **options)(blank, 0)


def test_guided_backprop_names_the_sigmoid_gates_it_leaves_alone():
    class Gated(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.gate = nn.Sigmoid()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            features = torch.relu(self.conv(x))
            squeezed = features.mean(dim=(2, 3), keepdim=True)
            features = features * self.gate(squeezed) * nn.functional.hardsigmoid(squeezed)
            return self.fc(features.mean(dim=(2, 3)))

    model = cnnscope.load_model(Gated().eval(), preprocess=cnnscope.Preprocess((16, 16), mean=(0, 0, 0), std=(1, 1, 1)))
    with pytest.warns(cnnscope.CnnscopeWarning, match=r"plain gradient: sigmoid \(1 call\), hardsigmoid \(1 call\)"):
        cnnscope.get_method("guided-backprop")(model)(torch.rand(1, 3, 16, 16), 0)


def test_layer_references_carry_their_layout():
    from cnnscope.testing import tiny_vit

    assert tiny_model().default_layer().layout == Layout("channels-first")
    vit_layer = tiny_vit().default_layer()
    assert vit_layer.layout.kind == "tokens" and vit_layer.layout.grid == (1, 8, 8)
    values = torch.arange(2 * 65 * 4, dtype=torch.float32).view(2, 65, 4)
    grid = vit_layer.layout.to_map(values)
    assert (
        grid.shape == (2, 4, 8, 8)
        and torch.equal(grid[:, :, 0, 0], values[:, 1])
        and vit_layer.layout.channel_axis(3) == 2
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (None, "top1"),
        ("top5", "top5"),
        (["positive"], "positive"),
        ("281;285", ["281", "285"]),
        (["Egyptian cat", "tabby, tabby cat"], ["Egyptian cat", "tabby, tabby cat"]),
    ],
)
def test_target_text_is_parsed_in_one_place(text, expected):
    assert parse_target_text(text) == expected


def test_comma_separated_targets_split_unless_they_name_a_class(default_model):
    logits = torch.zeros(1, 1000)
    labels = default_model.labels
    assert resolve_targets(["281, 285"], logits, labels).tolist() == [[281, 285]]
    assert resolve_targets(["tabby, tabby cat"], logits, labels).tolist() == [[281]]
    assert resolve_targets(parse_target_text("Egyptian cat,tiger cat"), logits, labels).tolist() == [[285, 282]]


def test_a_callable_target_explains_a_score_of_the_logits():
    """pytorch-grad-cam's callable targets: the difference between two classes, explained as it is."""
    from cnnscope.testing.models import IDENTITY_PREPROCESS

    model = tiny_model()
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))

    def two_minus_zero(logits):
        return logits[:, 2] - logits[:, 0]

    class Difference(nn.Module):  # the same score as a model's only output, for the reference
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            return two_minus_zero(self.net(x)).unsqueeze(1)

    reference = cnnscope.load_model(Difference(model.module).eval(), preprocess=IDENTITY_PREPROCESS)
    for name in ("gradcam", "saliency", "integrated-gradients"):
        options = {"steps": 8} if name == "integrated-gradients" else {}
        ours = cnnscope.get_method(name)(model, **options)(images, two_minus_zero)
        expected = cnnscope.get_method(name)(reference, **options)(images, 0)
        torch.testing.assert_close(ours.raw, expected.raw, msg=name)
        assert ours.labels == ("two_minus_zero",) and ours.targets.tolist() == [[0], [0]]
    with torch.no_grad():
        score = two_minus_zero(model.module(images))
    occlusion = cnnscope.get_method("occlusion")(model, window=16, stride=16, quiet=True)(images, two_minus_zero)
    torch.testing.assert_close(occlusion.probabilities[:, 0], score)  # the score itself, no softmax
    assert occlusion.raw.abs().max() > 0
    pair = cnnscope.get_method("gradcam")(model)(images, lambda logits: logits[:, [1, 3]])
    assert pair.labels == ("score[0]", "score[1]") and pair.raw.shape[1] == 2
    with pytest.raises(cnnscope.ModelError, match="callable target must map"):
        cnnscope.get_method("gradcam")(model)(images, lambda logits: logits.sum())
