import pytest

import cnnscope
from cnnscope._registry import Registry
from cnnscope.errors import CnnscopeError, MethodError


def test_duplicates_are_errors():
    registry = Registry("thing")
    registry.register("a", 1)
    with pytest.raises(ValueError, match="registered twice"):
        registry.register("A", 2)


def test_unknown_names_suggest():
    with pytest.raises(CnnscopeError, match="did you mean 'gradcam'"):
        cnnscope.get_method("gradcm")


def test_methods_are_listed_from_the_registry():
    assert {"cam", "gradcam"} <= set(cnnscope.list_methods())
    assert "efficientnet_lite0" in cnnscope.list_models()


def test_unknown_option_is_named(default_model):
    with pytest.raises(MethodError, match="gradcam has no option 'reul'; did you mean 'relu'"):
        cnnscope.get_method("gradcam")(default_model, reul=False)
