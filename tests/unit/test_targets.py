import pytest
import torch

from cnnscope import TargetError
from cnnscope.models.labels import imagenet_labels
from cnnscope.targets import class_index, resolve_targets

LABELS = imagenet_labels()


@pytest.fixture
def logits() -> torch.Tensor:
    values = torch.zeros(2, 1000)
    values[0, 285], values[0, 281], values[0, 7] = 9.0, 8.0, 7.0
    values[1, 967], values[1, 968], values[1, 504] = 9.0, 8.0, 7.0
    return values


def test_top_k(logits):
    assert resolve_targets(None, logits, LABELS).tolist() == [[285], [967]]
    assert resolve_targets("top3", logits, LABELS).tolist() == [[285, 281, 7], [967, 968, 504]]
    assert resolve_targets("TOP2", logits, LABELS).shape == (2, 2)


def test_index_name_and_lists(logits):
    assert resolve_targets(285, logits, LABELS).tolist() == [[285], [285]]
    assert resolve_targets("285", logits, LABELS).tolist() == [[285], [285]]
    assert resolve_targets("egyptian CAT", logits, LABELS).tolist() == [[285], [285]]
    assert resolve_targets("tabby cat", logits, LABELS).tolist() == [[281], [281]]  # a synonym
    assert resolve_targets(["espresso", 3], logits, LABELS).tolist() == [[967, 3], [967, 3]]


def test_per_image_lists_pad_with_minus_one(logits):
    assert resolve_targets([[285], ["espresso", "cup"]], logits, LABELS).tolist() == [[285, -1], [967, 968]]
    with pytest.raises(TargetError, match="3 per-image target lists for 2 images"):
        resolve_targets([[1], [2], [3]], logits, LABELS)


def test_multilabel_positives(logits):
    scores = torch.full((2, 4), -5.0)
    scores[0, 1] = scores[0, 3] = scores[1, 2] = 5.0
    labels = ["a", "b", "c", "d"]
    assert resolve_targets("positive", scores, labels, multilabel=True).tolist() == [[1, 3], [2, -1]]
    with pytest.raises(TargetError, match="single-label"):
        resolve_targets("positive", scores, labels)
    assert resolve_targets("positive", torch.zeros(1, 4), labels, multilabel=True, threshold=0.9).tolist() == [[-1]]


@pytest.mark.parametrize(
    ("target", "fragment"),
    [
        (1000, "out of range; this model has classes 0 to 999"),
        (-1, "out of range"),
        ("top0", "between 1 and 1000"),
        ("egyptian cats", "did you mean 'egyptian cat'"),
        ("crane", "ambiguous: 134 (crane), 517 (crane)"),
        ([], "empty"),
        (2.5, "is a float"),
        (True, "is a bool"),
    ],
)
def test_errors_name_the_problem(logits, target, fragment):
    with pytest.raises(TargetError, match=None) as info:
        resolve_targets(target, logits, LABELS)
    assert fragment in str(info.value)


def test_class_index_exact():
    assert class_index("espresso", LABELS) == 967
