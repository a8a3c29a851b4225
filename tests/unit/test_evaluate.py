"""cnnscope.evaluate: metrics on maps, ROAD's imputation, the randomization sanity checks and evaluate()."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sparse
import scipy.sparse.linalg as sparse_linalg
import torch
from torch import nn

from cnnscope import Model, Preprocess
from cnnscope.errors import InputError
from cnnscope.evaluate import (
    energy_in_mask,
    evaluate,
    gini,
    impute,
    is_constant,
    pointing_game,
    randomization_stages,
    score_maps,
    similarity,
)
from cnnscope.evaluate.metrics import center_map, scaled_tolerance
from cnnscope.evaluate.sanity import randomized
from cnnscope.methods import SmoothGrad
from cnnscope.testing.models import QuadrantNet, tiny_model

# -- metrics ---------------------------------------------------------------------------------------


def test_pointing_game_follows_torchrays_tolerance_scaled_with_the_size():
    mask = np.zeros((224, 224), dtype=bool)
    mask[100:120, 100:120] = True
    heat = np.zeros((224, 224))
    heat[110, 110] = 1.0
    assert pointing_game(heat, mask) is True
    heat = np.zeros((224, 224))
    heat[110, 134] = 1.0  # 15 px right of the object's last column (119)
    assert pointing_game(heat, mask) is True
    heat = np.zeros((224, 224))
    heat[110, 135] = 1.0  # 16 px: a miss
    assert pointing_game(heat, mask) is False
    assert pointing_game(heat, mask, tolerance=16) is True
    # at 112 px the same 15 px at 224 become 7.5 px
    assert scaled_tolerance((112, 112)) == pytest.approx(7.5)
    small = mask[::2, ::2]
    heat = np.zeros((112, 112))
    heat[55, 59 + 8] = 1.0  # 8 px from the object's last column (59)
    assert pointing_game(heat, small) is False
    heat = np.zeros((112, 112))
    heat[55, 59 + 7] = 1.0
    assert pointing_game(heat, small) is True
    # a constant map points nowhere; an empty mask cannot be pointed at
    assert pointing_game(np.ones((112, 112)), small) is False
    assert pointing_game(heat, np.zeros((112, 112), bool)) is None


def test_energy_is_offset_free_and_gini_measures_concentration():
    mask = np.zeros((10, 10), dtype=bool)
    mask[:5] = True
    heat = np.zeros((10, 10))
    heat[:5] = 3.0
    heat[5:] = 1.0
    assert energy_in_mask(heat, mask) == pytest.approx(1.0)  # the floor of 1 is an offset, not mass
    assert energy_in_mask(heat + 100.0, mask) == pytest.approx(1.0)
    signed = np.where(mask, 2.0, -5.0)
    assert energy_in_mask(signed, mask, signed=True) == pytest.approx(1.0)  # negative evidence is not mass
    assert energy_in_mask(np.random.default_rng(0).random((100, 100)), np.eye(100, dtype=bool)) < 0.02
    assert gini(np.ones((8, 8))) == 0.0
    one = np.zeros((8, 8))
    one[3, 3] = 1.0
    assert gini(one) == pytest.approx(63 / 64)
    assert is_constant(np.full((4, 4), 7.0)) and is_constant(np.zeros((4, 4))) and not is_constant(one)
    with pytest.raises(InputError, match="NaN"):
        gini(np.full((4, 4), np.nan))
    with pytest.raises(InputError, match="resize the mask"):
        energy_in_mask(one, np.ones((4, 4), bool))


# -- ROAD ------------------------------------------------------------------------------------------


def _exact_imputation(image: np.ndarray, removed: np.ndarray) -> np.ndarray:
    """The noise-free imputation by one sparse solve per image (the definition, written out)."""
    height, width = removed.shape
    index = -np.ones((height, width), dtype=int)
    ys, xs = np.nonzero(removed)
    index[ys, xs] = np.arange(len(ys))
    weights = {(dy, dx): (1 / 12 if dy and dx else 1 / 6) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx}
    rows, cols, values = [], [], []
    rhs = np.zeros((len(ys), image.shape[0]))
    for n, (y, x) in enumerate(zip(ys, xs, strict=True)):
        diagonal = 0.0
        for (dy, dx), weight in weights.items():
            yy, xx = y + dy, x + dx
            if 0 <= yy < height and 0 <= xx < width:
                diagonal += weight
                if removed[yy, xx]:
                    rows.append(n), cols.append(index[yy, xx]), values.append(-weight)
                else:
                    rhs[n] += weight * image[:, yy, xx]
        rows.append(n), cols.append(n), values.append(diagonal)
    matrix = sparse.csc_matrix((values, (rows, cols)), shape=(len(ys), len(ys)))
    solution = sparse_linalg.spsolve(matrix, rhs)
    out = image.copy()
    out[:, ys, xs] = solution.T
    return out


def test_road_imputation_solves_the_papers_linear_system():
    rng = np.random.default_rng(0)
    images = rng.random((2, 3, 20, 24)).astype(np.float32)
    removed = rng.random((2, 20, 24)) < 0.6
    removed[1, 4:16, 5:20] = True  # a large hole too
    got = impute(torch.from_numpy(images), torch.from_numpy(removed), noise=0.0, tolerance=1e-6)
    for i in range(2):
        expected = _exact_imputation(images[i].astype(np.float64), removed[i])
        np.testing.assert_allclose(got[i].numpy(), expected, atol=2e-4)
        kept = ~removed[i]
        assert np.array_equal(got[i].numpy()[:, kept], images[i][:, kept])  # kept pixels untouched
    noisy = impute(torch.from_numpy(images), torch.from_numpy(removed), generator=torch.Generator().manual_seed(1))
    again = impute(torch.from_numpy(images), torch.from_numpy(removed), generator=torch.Generator().manual_seed(1))
    assert torch.equal(noisy, again) and not torch.allclose(noisy, got)
    with pytest.raises(InputError, match="every pixel removed"):
        impute(torch.from_numpy(images), torch.ones(2, 20, 24, dtype=torch.bool))


def test_road_both_preconditioners_reach_the_exact_imputation_at_the_default_tolerance():
    """A CAM-like hole (large removed blocks) takes the multigrid preconditioner, a gradient-like one
    (scattered pixels) takes Jacobi; at the default tolerance both are within a fifth of the added noise
    (1% of the range) of one exact sparse solve."""
    from cnnscope.evaluate.road import MULTIGRID_SHARE, block_share

    rng = np.random.default_rng(3)
    images = torch.nn.functional.avg_pool2d(torch.from_numpy(rng.random((2, 3, 72, 80)).astype(np.float32)), 5, 1, 2)
    coarse = torch.from_numpy(rng.random((1, 1, 9, 10)).astype(np.float32))
    removed = torch.zeros(2, 72, 80, dtype=torch.bool)
    removed[0] = torch.nn.functional.interpolate(coarse, size=(72, 80))[0, 0] > 0.3  # 70% in 8x8 blocks
    removed[1] = torch.from_numpy(rng.random((72, 80)) < 0.5)
    share = block_share(removed.unsqueeze(1).float())
    assert share[0] >= MULTIGRID_SHARE > share[1]
    got = impute(images, removed, noise=0.0)
    for i in range(2):
        expected = _exact_imputation(images[i].double().numpy(), removed[i].numpy())
        np.testing.assert_allclose(got[i].numpy(), expected, atol=2e-3)


# -- a model whose evidence is known ---------------------------------------------------------------


class Sharpened(nn.Module):
    """QuadrantNet with its logits scaled, so that the probability follows the evidence closely."""

    def __init__(self) -> None:
        super().__init__()
        self.net = QuadrantNet(size=32)
        self.scale = 12.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) * self.scale


def blob_data(count: int = 8, seed: int = 0):
    """Dark noise with one bright square in quadrant ``label``: the class's only evidence is the square."""
    rng = np.random.default_rng(seed)
    images, labels, masks = [], [], []
    for i in range(count):
        q = i % 4
        image = (rng.random((32, 32, 3)) * 25).astype(np.uint8)
        cy = (8 if q < 2 else 24) + int(rng.integers(-3, 4))
        cx = (8 if q % 2 == 0 else 24) + int(rng.integers(-3, 4))
        mask = np.zeros((32, 32), dtype=bool)
        mask[cy - 3 : cy + 3, cx - 3 : cx + 3] = True
        image[mask] = 255
        images.append(image), labels.append(q), masks.append(mask)
    return np.stack(images), labels, masks


@pytest.fixture(scope="module")
def quadrant():
    preprocess = Preprocess(size=(32, 32), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    return Model(Sharpened().eval(), labels=["tl", "tr", "bl", "br"], preprocess=preprocess, name="quadrant")


def test_a_map_on_the_evidence_beats_random_maps_on_every_metric_and_the_centre_on_pointing(quadrant):
    images, labels, masks = blob_data(8)
    batch = quadrant.preprocess(list(images))
    rng = np.random.default_rng(1)
    totals = {"oracle": [], "random": [], "center": []}
    for i in range(len(images)):
        oracle = torch.from_numpy(masks[i].astype(np.float32))
        oracle = oracle + 0.001 * torch.rand(32, 32, generator=torch.Generator().manual_seed(i))  # break ties
        maps = [oracle, torch.from_numpy(rng.random((32, 32))).float(), torch.from_numpy(center_map((32, 32))).float()]
        rows, curves = score_maps(quadrant, batch[i : i + 1], maps, labels[i], mask=masks[i], steps=12)
        for name, row in zip(totals, rows, strict=True):
            totals[name].append(row)
        assert curves["deletion"].shape == (3, 12) and curves["road_morf"].shape == (3, 5)

    def mean(name: str, key: str) -> float:
        return float(np.mean([row[key] for row in totals[name]]))

    assert mean("oracle", "pointing_game") == 1.0 and mean("center", "pointing_game") == 0.0
    assert mean("oracle", "energy_pointing_game") > 0.9 > 0.1 > mean("random", "energy_pointing_game")
    for key, higher_is_better in (
        ("pointing_game", True),
        ("energy_pointing_game", True),
        ("deletion_auc", False),
        ("insertion_auc", True),
        ("road_morf", False),
        ("road_lerf", True),
        ("gini", True),
    ):
        oracle, random = mean("oracle", key), mean("random", key)
        assert (oracle > random) if higher_is_better else (oracle < random), (key, oracle, random)


def test_evaluate_scores_methods_beside_baselines_and_sanity_checks_them(quadrant):
    images, labels, masks = blob_data(8)
    state = {k: v.clone() for k, v in quadrant.module.state_dict().items()}
    rng_state = torch.random.get_rng_state()
    result = evaluate(
        quadrant, (images, labels, masks), methods="gradcam,gradxinput", sanity=True, sanity_images=4, steps=6
    )
    data = result.to_json()
    assert [m["name"] for m in data["methods"]] == ["gradcam", "gradxinput"]
    assert set(data["baselines"]) == {"center", "random", "random_smooth"}
    gradcam = result.method("gradcam")
    keys = {"pointing_game", "energy_pointing_game", "deletion_auc", "insertion_auc", "road_morf", "road_lerf", "gini"}
    assert keys <= set(gradcam["metrics"])
    assert gradcam["counts"]["pointing_game"] == 8
    # Grad-CAM of a GAP model finds the class's quadrant, and so the square in it
    assert gradcam["metrics"]["pointing_game"] >= 0.75 > data["baselines"]["center"]["metrics"]["pointing_game"]
    assert gradcam["metrics"]["deletion_auc"] < data["baselines"]["random"]["metrics"]["deletion_auc"]
    stages = [s["stage"] for s in gradcam["sanity"]]
    assert stages == ["net.fc", "net.features"]  # from the head down, the last one leaves nothing trained
    assert {"stage", "spearman_abs", "spearman", "ssim", "hog"} <= set(gradcam["sanity"][0])
    assert gradcam["sanity"][-1]["spearman_abs"] < 0.9 and gradcam["seed_spearman_abs"] == 1.0
    # the user's model and random state are as they were
    assert all(torch.equal(v, quadrant.module.state_dict()[k]) for k, v in state.items())
    assert torch.equal(rng_state, torch.random.get_rng_state())


def test_evaluate_stops_at_max_seconds_and_keeps_what_was_scored(quadrant):
    images, labels, masks = blob_data(8)
    result = evaluate(quadrant, (images, labels, masks), methods="gradcam", batch_size=2, steps=4, max_seconds=0.0)
    # the first batch always runs; the limit is checked between batches
    assert not result.complete and result.images >= 0
    with pytest.raises(InputError, match="target must be"):
        evaluate(quadrant, (images, labels, masks), methods="gradcam", target="top3")
    with pytest.raises(Exception, match="did you mean"):
        evaluate(quadrant, (images, labels, masks), methods="gradcm")


def test_road_can_be_turned_off_for_large_images(quadrant):
    images, labels, masks = blob_data(4)
    result = evaluate(quadrant, (images, labels, masks), methods="gradcam", steps=4, fractions=())
    metrics = result.method("gradcam")["metrics"]
    assert metrics["road_morf"] is None and metrics["road_lerf"] is None
    assert metrics["deletion_auc"] is not None and metrics["pointing_game"] == 1.0
    assert result.to_json()["settings"]["road_fractions"] == []


def test_a_method_that_fails_is_left_out_with_its_reason(quadrant, monkeypatch):
    from cnnscope.errors import MethodError
    from cnnscope.methods import Saliency

    def broken(self, batch, resolve):
        raise MethodError("saliency cannot run here")

    monkeypatch.setattr(Saliency, "compute", broken)
    images, labels, masks = blob_data(4)
    result = evaluate(quadrant, (images, labels, masks), methods="gradcam,saliency", steps=4, fractions=(0.5,))
    assert [m["name"] for m in result.methods] == ["gradcam"]
    assert result.to_json()["failed_methods"] == [{"name": "saliency", "reason": "saliency cannot run here"}]
    with pytest.raises(MethodError, match="cannot run here"):  # alone, the failure is the answer
        evaluate(quadrant, (images, labels, masks), methods="saliency")


# -- sanity ----------------------------------------------------------------------------------------


def test_randomization_stages_follow_the_blocks_from_the_head_and_leave_the_model_alone():
    from cnnscope.data import SmallCNN

    net = SmallCNN(4, generator=torch.Generator().manual_seed(0))
    stages = randomization_stages(net)
    assert stages[0].modules == ("classifier",)
    assert stages[-1].modules == ("features.0", "features.1")  # the first conv with its norm
    assert 4 <= len(stages) <= 8
    model = Model(net.eval(), preprocess=Preprocess(size=(32, 32), mean=(0.0,) * 3, std=(1.0,) * 3))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    copy = randomized(model, stages, len(stages) - 1, seed=3)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())
    changed = [
        k for k, v in copy.module.state_dict().items() if v.dtype.is_floating_point and not torch.equal(v, before[k])
    ]
    assert any(k.startswith("classifier") for k in changed) and any(k.startswith("features.0") for k in changed)
    only_head = randomized(model, stages, 0, cascading=False, seed=3).module.state_dict()
    assert torch.equal(only_head["features.0.weight"], before["features.0.weight"])
    assert not torch.equal(only_head["classifier.weight"], before["classifier.weight"])
    many = randomization_stages(tiny_model().module, max_stages=2)
    assert len(many) <= 2


def test_similarity_measures():
    rng = np.random.default_rng(0)
    a = rng.random((32, 32))
    same = similarity(a, a)
    assert all(v == pytest.approx(1.0) for v in same.values())
    flipped = similarity(a, -a)
    assert flipped["spearman"] == pytest.approx(-1.0) and flipped["spearman_abs"] == pytest.approx(1.0)
    unrelated = similarity(a, rng.random((32, 32)))
    assert abs(unrelated["spearman_abs"]) < 0.1
    assert similarity(a, np.zeros((32, 32))) == dict.fromkeys(same, 0.0)


# -- SmoothGrad's aggregation ----------------------------------------------------------------------


def test_smoothgrad_aggregations_follow_their_definitions():
    model = tiny_model()
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    common = {"samples": 6, "seed": 2, "noise": 0.2}
    # with a linear reduction (sum), averaging maps and averaging attributions are the same thing
    by_maps = SmoothGrad(model, aggregate="maps", reduce="sum", **common)(images, 0)
    by_mean = SmoothGrad(model, aggregate="mean", reduce="sum", **common)(images, 0)
    torch.testing.assert_close(by_maps.raw, by_mean.raw, rtol=1e-5, atol=1e-7)
    # with max-abs they differ: the mean of maxima is at least the maximum of the mean
    maps = SmoothGrad(model, aggregate="maps", **common)(images, 0).raw
    mean = SmoothGrad(model, aggregate="mean", **common)(images, 0)
    assert (maps >= mean.raw - 1e-7).all() and not torch.allclose(maps, mean.raw)
    torch.testing.assert_close(mean.raw, mean.channels[:, :, :].abs().amax(dim=2))
    square = SmoothGrad(model, aggregate="square", **common)(images, 0)
    variance = SmoothGrad(model, aggregate="variance", **common)(images, 0)
    # E[g^2] = Var[g] + E[g]^2, channel by channel
    torch.testing.assert_close(square.channels, variance.channels + mean.channels.square(), rtol=1e-4, atol=1e-9)
    assert not square.signed and not variance.signed and (variance.raw >= 0).all()


@pytest.mark.slow
def test_cascading_randomization_on_the_default_model_reproduces_the_papers_finding(default_model, chelsea, coffee):
    """Grad-CAM and the gradient lose their ranking once the model is randomized (far below their seed-to-seed
    similarity of 1, being deterministic); guided backprop stays more similar than Grad-CAM (Adebayo et al.)."""
    from cnnscope import get_method
    from cnnscope.evaluate import model_randomization

    pictures = [chelsea, coffee]
    targets = [[285], [967]]
    curves = {}
    for name in ("gradcam", "saliency", "guided-backprop"):

        def maps_of(model, name=name):
            return get_method(name)(model)(pictures, targets).maps[:, 0].float().numpy()

        curves[name] = model_randomization(default_model, maps_of, max_stages=5, seed=0)
    assert curves["gradcam"][0]["stage"] == "_fc"
    for name in ("gradcam", "saliency"):
        assert curves[name][-1]["spearman_abs"] < 0.5, (name, curves[name][-1])
    mean = {name: np.mean([s["spearman_abs"] for s in stages]) for name, stages in curves.items()}
    assert mean["guided-backprop"] > mean["gradcam"], mean


def test_the_readme_table_lists_every_registered_method_and_the_baselines():
    """The README's evaluate table (``cnnscope evaluate --demo --markdown``) is regenerated when a method is added."""
    from pathlib import Path

    from cnnscope import list_methods

    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    table = text.split("<!-- evaluate:start -->")[1].split("<!-- evaluate:end -->")[0]
    rows = [line.split("|")[1].strip() for line in table.strip().splitlines()[2:]]
    assert rows == [*list_methods(), "*center baseline*", "*random baseline*", "*random_smooth baseline*"]


def test_data_randomization_compares_with_the_shuffled_label_model(quadrant):
    from cnnscope import get_method
    from cnnscope.evaluate import data_randomization

    images, labels, _ = blob_data(4)

    def maps_of(model):
        return get_method("gradcam")(model)(list(images), [[t] for t in labels]).maps[:, 0].numpy()

    same = data_randomization(quadrant, quadrant, maps_of)
    assert same["spearman_abs"] == pytest.approx(1.0) and same["ssim"] == pytest.approx(1.0)
    shuffled = Sharpened().eval()
    with torch.no_grad():  # a head that reads the quadrants in another order: "trained" on shuffled labels
        shuffled.net.fc.weight.copy_(shuffled.net.fc.weight[[3, 2, 1, 0]])
    other = Model(shuffled, labels=quadrant.labels, preprocess=quadrant.preprocess)
    assert data_randomization(quadrant, other, maps_of)["spearman_abs"] < 0.5
    with pytest.raises(InputError, match="same classes"):
        data_randomization(quadrant, tiny_model(), maps_of)
