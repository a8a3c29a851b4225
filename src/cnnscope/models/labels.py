"""Class labels shipped with the package."""

from __future__ import annotations

from functools import lru_cache
from importlib import resources


@lru_cache(maxsize=1)
def imagenet_labels() -> tuple[str, ...]:
    """The 1,000 ImageNet-1k class names in index order, each as its WordNet synonyms
    (``"tabby, tabby cat"``); the first synonym is the short name."""
    text = resources.files(__package__).joinpath("data/imagenet_classes.tsv").read_text(encoding="utf-8")
    names = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        index, _synset, name = line.split("\t")
        if int(index) != len(names):
            raise RuntimeError("imagenet_classes.tsv is out of order")
        names.append(name)
    return tuple(names)


def short_name(label: str) -> str:
    """'tabby, tabby cat' -> 'tabby'."""
    return label.split(",")[0].strip()
