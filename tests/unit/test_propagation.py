"""LRP, DeepLIFT and excitation backprop: the axioms, on models with every kind of activation call."""

import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cnnscope
from cnnscope.methods.propagation import COMPOSITES, PropagationMethod
from cnnscope.models import Model
from cnnscope.testing import quadrant_model
from cnnscope.testing.models import IDENTITY_PREPROCESS


class Mixed(nn.Module):
    """An in-place ReLU module called three times, a functional relu, a residual add, a convolution called
    twice, average and max pooling, a mean and a linear head."""

    def __init__(self, bias: bool = False, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.c1 = nn.Conv2d(3, 8, 3, padding=1, bias=bias)
        self.relu = nn.ReLU(inplace=True)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1, bias=bias)
        self.c3 = nn.Conv2d(8, 8, 3, padding=1, bias=bias)
        self.fc = nn.Linear(8, 4, bias=bias)
        with torch.no_grad():
            for param in self.parameters():
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)

    def forward(self, x):
        x = self.relu(self.c1(x))
        y = F.relu(self.c2(x))
        x = x + y
        x = self.relu(self.c3(x))
        x = F.max_pool2d(F.avg_pool2d(x, 2), 2) if x.shape[-1] >= 8 else x
        x = self.relu(self.c3(x))
        return self.fc(x.mean((2, 3)))


def mixed(bias: bool = False) -> Model:
    return Model(Mixed(bias).eval(), labels=list("abcd"), preprocess=IDENTITY_PREPROCESS, name="mixed")


IMAGES = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def relevance_sums(explanation):
    return explanation.raw.flatten(2).sum(dim=2)


@pytest.mark.parametrize("composite", list(COMPOSITES))
def test_lrp_conserves_the_logit_on_a_bias_free_relu_net(composite):
    model = mixed(bias=False)
    explanation = cnnscope.get_method("lrp")(model, composite=composite)(IMAGES, "top2")
    logits = model(IMAGES).detach().gather(1, explanation.targets)
    torch.testing.assert_close(relevance_sums(explanation), logits, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("baseline", ["black", "noise", "tensor"])
def test_deeplift_and_ig_sum_to_the_output_difference(baseline):
    model = mixed(bias=True)
    base = torch.full_like(IMAGES[:1], 0.3) if baseline == "tensor" else baseline
    deeplift = cnnscope.get_method("deeplift")(model, baseline=base)(IMAGES, "top2")
    reference = deeplift_reference = cnnscope.get_method("deeplift")(model, baseline=base).baseline_for(IMAGES)
    with torch.no_grad():
        gain = model(IMAGES).gather(1, deeplift.targets) - model(deeplift_reference).gather(1, deeplift.targets)
    torch.testing.assert_close(relevance_sums(deeplift), gain, rtol=1e-4, atol=1e-4)
    assert max(abs(v) for row in deeplift.stats["completeness_gap"] for v in row) < 1e-4
    ig = cnnscope.get_method("integrated-gradients")(model, baseline=base, steps=128)(IMAGES, "top2")
    torch.testing.assert_close(relevance_sums(ig), gain, rtol=2e-2, atol=2e-2)
    assert reference.shape == IMAGES.shape


def test_deeplift_equals_gradient_x_input_on_a_homogeneous_net_from_black():
    """A bias-free ReLU net is positively homogeneous: from a zero reference every rescale multiplier is the
    gradient, so DeepLIFT is gradient x input."""
    model = mixed(bias=False)
    deeplift = cnnscope.get_method("deeplift")(model)(IMAGES, "top1")
    gxi = cnnscope.get_method("gradxinput")(model)(IMAGES, "top1")
    torch.testing.assert_close(deeplift.raw, gxi.raw, rtol=1e-4, atol=1e-6)


class Reshaping(nn.Module):
    """A head that flattens each row (``flatten(1)``), views by the batch size (``x.view(x.size(0), -1)``), or
    splits each row in four rows and back (a shape no one-row reference can take)."""

    def __init__(self, how: str) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.how = how
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):
        x = F.adaptive_avg_pool2d(F.relu(self.conv(x)), 4)
        if self.how == "rows":
            x = x.flatten(1)
        elif self.how == "view":
            x = x.view(x.size(0), -1)
        else:
            x = torch.tanh(x.reshape(x.size(0) * 4, -1)).reshape(x.size(0), -1)
        return self.fc(torch.tanh(x))


def test_deeplift_runs_one_shared_reference_and_falls_back_when_the_forward_mixes_rows(monkeypatch):
    """A reference that is the same for every image (a black baseline) runs once, one row broadcast against the
    batch (a view by the batch size included); a forward that reshapes rows into several cannot take one row, and
    gets one reference per row: the same maps as a reference per row, each summing to f(x) - f(x')."""
    from cnnscope.methods import propagation

    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    fallbacks = []
    unshared = propagation._Unshared

    class Counted(unshared):
        def __init__(self, *args):
            fallbacks.append(1)
            super().__init__(*args)

    for how, falls_back in (("rows", False), ("view", False), ("split", True)):
        model = Model(Reshaping(how).eval(), labels=list("abc"), preprocess=IDENTITY_PREPROCESS, name="r")
        method = cnnscope.get_method("deeplift")(model)
        monkeypatch.setattr(propagation, "_Unshared", Counted)
        fallbacks.clear()
        shared = method(images, "top2")
        assert bool(fallbacks) == falls_back, how
        assert max(abs(v) for row in shared.stats["completeness_gap"] for v in row) < 1e-4
        # one reference per row, as before: a baseline tensor whose rows differ by less than rounding
        monkeypatch.setattr(propagation, "_Unshared", unshared)
        per_row = method.baseline_for(images).clone()
        per_row[1:] = per_row[1:] + 1e-30  # not equal, so not shared
        separate = cnnscope.get_method("deeplift")(model, baseline=per_row)(images, "top2")
        torch.testing.assert_close(shared.raw, separate.raw, rtol=1e-5, atol=1e-6)


class ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.conv1, self.bn1 = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.conv2, self.bn2 = nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 3)
        with torch.no_grad():
            for bn in (self.bn1, self.bn2):
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.running_var.uniform_(0.5, 2)
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.2, 0.2)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def test_batchnorm_is_merged_into_the_convolution_before_it():
    """LRP on conv -> BN equals LRP on the model folded by models/folding.py (Zennit's canonizer)."""
    from cnnscope.models.folding import fold_batchnorm

    model = Model(ConvBN().eval(), labels=list("abc"), preprocess=IDENTITY_PREPROCESS, name="bn")
    folded, count = fold_batchnorm(model)
    assert count == 2
    for composite in ("epsilon-plus-flat", "epsilon-gamma-box", "epsilon"):  # z+, z-box and gamma, epsilon
        ours = cnnscope.get_method("lrp")(model, composite=composite)(IMAGES, "top1")
        reference = cnnscope.get_method("lrp")(folded, composite=composite)(IMAGES, "top1")
        torch.testing.assert_close(ours.raw, reference.raw, rtol=1e-4, atol=1e-6)


def test_a_rule_per_layer_name():
    model = mixed(bias=True)
    gamma_box = cnnscope.get_method("lrp")(model, composite="epsilon-gamma-box")(IMAGES, "top1")
    named = cnnscope.get_method("lrp")(model, composite="epsilon-gamma-box", rules={"c1": "flat"})(IMAGES, "top1")
    flat = cnnscope.get_method("lrp")(model, composite="epsilon-gamma-box", rules={"c1": "zbox"})(IMAGES, "top1")
    torch.testing.assert_close(flat.raw, gamma_box.raw)  # zbox is already the first layer's rule there
    assert not torch.allclose(named.raw, gamma_box.raw)
    # a flat first layer spreads each unit's relevance evenly over its 3x3 window, whatever the pixels
    torch.testing.assert_close(relevance_sums(named), relevance_sums(gamma_box), rtol=1e-4, atol=1e-5)
    with pytest.raises(cnnscope.MethodError, match="does not have; did you mean 'c1'"):
        cnnscope.get_method("lrp")(model, rules={"c11": "zbox"})(IMAGES)
    with pytest.raises(cnnscope.MethodError, match="is not a rule"):
        cnnscope.get_method("lrp")(model, rules={"c1": "magic"})


@pytest.mark.parametrize("name", ["lrp", "deeplift", "excitation-backprop"])
def test_the_map_lies_in_the_targets_quadrant(name):
    model = quadrant_model()
    images = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2)) + 0.1
    explanation = cnnscope.get_method(name)(model)(images, [[0, 1, 2, 3]])
    for q in range(4):
        quadrants = explanation.raw[0, q].unflatten(0, (2, 16)).unflatten(2, (2, 16)).sum(dim=(1, 3)).flatten()
        assert int(quadrants.argmax()) == q
        assert float(quadrants[q]) > 0.99 * float(quadrants.abs().sum())


def test_excitation_backprop_conserves_probability_and_the_contrastive_form_contrasts():
    model = quadrant_model()
    images = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2)) + 0.1
    plain = cnnscope.get_method("excitation-backprop")(model)(images, [[0, 3]])
    torch.testing.assert_close(relevance_sums(plain), torch.ones(1, 2), rtol=1e-4, atol=1e-4)
    with torch.no_grad():  # every class now counts the other quadrants against it
        weight = model.module.fc.weight
        weight.copy_(torch.where(weight > 0, weight, torch.full_like(weight, -0.05)))
    contrastive = cnnscope.get_method("excitation-backprop")(model, contrastive=True)(images, [[0, 3]])
    torch.testing.assert_close(relevance_sums(contrastive), torch.zeros(1, 2), rtol=1e-4, atol=1e-4)
    top_left = contrastive.raw[0, 0, :16, :16].sum()
    assert top_left > 0 and contrastive.raw[0, 0, 16:, 16:].sum() < 0  # the dual class (the others) subtracts


def test_uncovered_calls_are_named_not_hidden():
    from cnnscope.testing import tiny_model

    model = tiny_model(outputs="probabilities")
    with pytest.warns(cnnscope.CnnscopeWarning, match=r"deeplift has no rule for these calls.*softmax \(1 call\)"):
        cnnscope.get_method("deeplift")(model)(IMAGES.new_ones(1, 3, 32, 32) * 0.5)
    # LRP and excitation backprop pass an output softmax's relevance on to the logit (no warning: it is a rule)
    explanation = cnnscope.get_method("excitation-backprop")(model)(IMAGES.new_ones(1, 3, 32, 32) * 0.5)
    assert float(explanation.raw.min()) >= 0 and float(explanation.raw.sum()) > 0


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_torchscript_is_refused_with_the_alternatives():
    from cnnscope.testing import TinyCNN

    scripted = torch.jit.trace(TinyCNN().eval(), torch.zeros(1, 3, 32, 32))
    model = Model(scripted, labels=list("abcde"), preprocess=IDENTITY_PREPROCESS, name="scripted")
    with pytest.raises(cnnscope.MethodError, match="TorchScript"):
        cnnscope.get_method("deeplift")(model)(IMAGES)


class ConvBNShared(ConvBN):
    """conv2's output goes through its BatchNorm and, beside it, into a residual sum of its own."""

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        z = self.conv2(x)
        x = F.relu(self.bn2(z)) + 0.5 * z
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("net", [ConvBN, ConvBNShared])
def test_deeplift_through_a_merged_batchnorm_is_deeplift_of_the_folded_model(net):
    """DeepLIFT runs a BatchNorm's backward as part of the convolution before it; where that convolution's output
    is also used directly, that use keeps the convolution's own multiplier."""
    from cnnscope.models.folding import fold_batchnorm

    module = net().eval()
    model = Model(module, labels=list("abc"), preprocess=IDENTITY_PREPROCESS, name="bn")
    explanation = cnnscope.get_method("deeplift")(model)(IMAGES, "top2")
    assert max(abs(v) for row in explanation.stats["completeness_gap"] for v in row) < 1e-4
    if net is ConvBN:
        folded, _ = fold_batchnorm(model)
        reference = cnnscope.get_method("deeplift")(folded)(IMAGES, explanation.targets)
        torch.testing.assert_close(explanation.raw, reference.raw, rtol=1e-4, atol=1e-6)


class Switching(Mixed):
    """With ``extra`` set, the forward takes one more call (a tanh): one forward's calls are not the last one's."""

    extra = False

    def forward(self, x):
        return torch.tanh(super().forward(x)) if self.extra else super().forward(x)


def fresh_deeplift(model: Model, images: torch.Tensor) -> torch.Tensor:
    """DeepLIFT's top-2 map by a new method with nothing kept on the model (what it kept is put back after)."""
    kept = dict(model.kept)
    model.kept.clear()
    try:
        return cnnscope.get_method("deeplift")(model)(images, "top2").raw
    finally:
        model.kept.clear()
        model.kept.update(kept)


def test_deeplift_hands_out_the_references_values_again_only_where_they_are_the_same():
    """The one-row reference's values of the last forward are handed out again for the same reference, weights
    and input shape (the maps bit for bit a fresh method's); new weights, another shape or a forward whose calls
    change all give a fresh method's maps."""
    model = mixed(bias=True)
    method = cnnscope.get_method("deeplift")(model)

    def fresh(images):
        return fresh_deeplift(model, images)

    first = method(IMAGES, "top2")
    kept = method._reference_run
    assert kept and len(kept.values) > 5
    assert torch.equal(method(IMAGES, "top2").raw, first.raw) and method._reference_run is kept  # replayed
    assert torch.equal(method(IMAGES.flip(-1), "top2").raw, fresh(IMAGES.flip(-1)))
    with torch.no_grad():
        model.module.c2.weight.mul_(1.5)  # the same tensor, a new version
    assert torch.equal(method(IMAGES, "top2").raw, fresh(IMAGES))
    assert method._reference_run and method._reference_run is not kept  # kept anew, for the new weights
    bigger = torch.rand(2, 3, 24, 24, generator=torch.Generator().manual_seed(2))
    assert torch.equal(method(bigger, "top2").raw, fresh(bigger))

    switching = Switching(bias=True).eval()
    changing = Model(switching, labels=list("abcd"), preprocess=IDENTITY_PREPROCESS, name="switching")
    method = cnnscope.get_method("deeplift")(changing)
    for extra in (False, True, False):
        switching.extra = extra
        ours = method(IMAGES, "top2")
        assert torch.equal(ours.raw, fresh_deeplift(changing, IMAGES))
        assert max(abs(v) for row in ours.stats["completeness_gap"] for v in row) < 1e-4
    assert method._reference_run is False  # the forward changed: nothing is kept any more


def test_deeplift_values_are_kept_with_the_model_for_every_method_on_it_and_never_pickled():
    """A new method on the same model (one per call, as cnnscope.explain makes) hands out the values the last
    one kept (those the forward read, not every call's), with the same maps; another model keeps its own; a
    pickled model ships none of them."""
    model = mixed(bias=True)
    first = cnnscope.get_method("deeplift")(model)(IMAGES, "top2")
    kept = model.kept[PropagationMethod.KEPT]
    assert kept and len(kept.values) > 5
    values = [v for _, entry in kept.values for v in (entry if isinstance(entry, list) else [entry])]
    assert any(v is None for v in values) and any(v is not None for v in values)  # only what the forward read
    again = cnnscope.get_method("deeplift")(model)(IMAGES, "top2")
    assert torch.equal(again.raw, first.raw) and model.kept[PropagationMethod.KEPT] is kept  # replayed
    assert torch.equal(again.raw, fresh_deeplift(model, IMAGES))
    other = mixed(bias=True)
    assert not other.kept
    copy = pickle.loads(pickle.dumps(model))
    assert copy.kept == {} and model.kept[PropagationMethod.KEPT] is kept
    assert torch.equal(cnnscope.get_method("deeplift")(copy)(IMAGES, "top2").raw, first.raw)


class TwoHeads(nn.Module):
    """Both heads run on every call; ``which`` picks the one returned: the same calls, another output."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.conv, self.heads = nn.Conv2d(3, 6, 3, padding=1), nn.ModuleList([nn.Linear(6, 4), nn.Linear(6, 4)])
        self.which = 0

    def forward(self, x):
        h = F.adaptive_avg_pool2d(F.relu(self.conv(x)), 1).flatten(1)
        return [head(h) for head in self.heads][self.which]


def test_deeplift_replay_of_the_same_calls_returning_another_tensor_reruns_the_forward():
    """A forward that makes the same calls but returns another of their outputs reads a reference value the
    kept run left out: the forward reruns (the map a fresh method gives), no internal error escapes."""
    net = TwoHeads().eval()
    model = Model(net, labels=list("abcd"), preprocess=IDENTITY_PREPROCESS, name="two heads")
    method = cnnscope.get_method("deeplift")(model)
    for which in (0, 1):
        net.which = which
        ours = method(IMAGES, "top2")
        assert torch.equal(ours.raw, fresh_deeplift(model, IMAGES))
        assert max(abs(v) for row in ours.stats["completeness_gap"] for v in row) < 1e-4


def test_a_kept_run_matches_only_the_same_weight_tensors_not_their_ids():
    """A kept run compares the weights by identity (weak references), not by id and version alone, which a new
    tensor can have once the old one is freed."""
    model = mixed(bias=True)
    cnnscope.get_method("deeplift")(model)(IMAGES, "top2")
    run = model.kept[PropagationMethod.KEPT]
    tensors = (*model.module.parameters(), *model.module.buffers())
    shape = tuple(IMAGES.shape)
    assert run.matches(run.reference, shape, run.state, tensors)
    copies = tuple(t.detach().clone() for t in tensors)  # the same ids and versions claimed, other tensors
    assert not run.matches(run.reference, shape, run.state, copies)


class Branching(nn.Module):
    """The forward picks one of two same-shape input-derived tensors by the first image's mean, scales by a small
    tensor it makes from an attribute, writes into a ReLU's output in place (``h[:, :, :2] = -1``), adds to a
    convolution's output in place before its BatchNorm and flattens by keyword."""

    def __init__(self, in_place: bool = True) -> None:
        super().__init__()
        torch.manual_seed(6)
        self.a, self.b = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(3, 6, 3, padding=1)
        self.c, self.bn = nn.Conv2d(6, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        self.fc = nn.Linear(6 * 4 * 4, 3)
        self.scale, self.in_place = 1.0, in_place
        with torch.no_grad():
            self.bn.running_var.uniform_(0.5, 2)
            self.bn.running_mean.uniform_(-0.3, 0.3)

    def forward(self, x):
        a, b = F.relu(self.a(x)), F.relu(self.b(x))
        h = a if x.mean(dim=(1, 2, 3)).tolist()[0] > 0.5 else b  # by the first image (a reference row each)
        h = h * torch.full((6, 1, 1), self.scale)
        h = F.relu(h)
        if self.in_place:
            h[:, :, :2] = -1.0  # written in place: no longer >= 0
        else:
            h = torch.cat([torch.full_like(h[:, :, :2], -1.0), h[:, :, 2:]], dim=2)
        z = self.c(h)
        if self.in_place:
            z += 0.1
        else:
            z = z + 0.1
        z = F.relu(self.bn(z))
        return self.fc(torch.flatten(input=F.adaptive_avg_pool2d(z, 4), start_dim=1))


def test_what_a_forward_does_between_calls_is_checked_not_assumed():
    """DeepLIFT's kept reference values are handed out only for the same calls on the same tensors (the branch
    a forward takes, the values of a tensor it makes); an in-place write ends what is known of a tensor's sign
    (LRP's z+ then keeps its negative part: the same map as the out-of-place write); a convolution's output
    written in place before its BatchNorm is not merged; calls by keyword are followed."""
    low, high = IMAGES * 0.5, IMAGES * 0.5 + 0.5
    for in_place in (False, True):
        net = Branching(in_place).eval()
        model = Model(net, labels=list("abc"), preprocess=IDENTITY_PREPROCESS, name="branching")
        for calls in (((low, 1.0), (low, 1.0), (low, 2.0)), ((low, 1.0), (low, 1.0), (high, 1.0))):
            model.kept.clear()  # what the last sequence's changed forward left on the model (nothing kept) forgotten
            method = cnnscope.get_method("deeplift")(model)
            for call, (images, scale) in enumerate(calls):
                net.scale = scale
                ours = method(images, "top2")
                if call < 2:  # kept, then handed out (not where a value is written in place); the third call
                    # differs (a tensor's values, the branch): checked
                    assert bool(getattr(method, "_reference_run", None)) != in_place
                assert torch.equal(ours.raw, fresh_deeplift(model, images))
                assert max(abs(v) for row in ours.stats["completeness_gap"] for v in row) < 1e-4
    net.scale = 1.0
    out_of_place = Branching(in_place=False).eval()
    for composite in ("epsilon-plus", "epsilon-alpha2-beta1"):
        lrp = cnnscope.get_method("lrp")(model, composite=composite)(low, "top1")
        other = Model(out_of_place, labels=list("abc"), preprocess=IDENTITY_PREPROCESS, name="copy")
        reference = cnnscope.get_method("lrp")(other, composite=composite)(low, lrp.targets)
        torch.testing.assert_close(lrp.raw, reference.raw, rtol=1e-5, atol=1e-6)
    excitation = cnnscope.get_method("excitation-backprop")(other)(low, "top1")  # (plain autograd, which
    # excitation backprop keeps at activations, cannot go back through a ReLU output written in place)
    assert torch.isfinite(excitation.raw).all()
