"""Options are declared once per method, typed; every interface checks them through the declaration."""

import json
import re
from pathlib import Path

import pytest
import torch

import cnnscope
from cnnscope.cli import main
from cnnscope.errors import MethodError
from cnnscope.methods import method_listing
from cnnscope.options import markdown_table
from cnnscope.testing import tiny_model

README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.mark.parametrize(
    ("method", "options", "expected"),
    [
        ("gradcam", {"relu": "false"}, {"relu": False}),
        ("gradcam", {"counterfactual": "TRUE"}, {"counterfactual": True}),
        ("integrated-gradients", {"steps": "16", "blur_sigma": "2.5"}, {"steps": 16, "blur_sigma": 2.5}),
        ("integrated-gradients", {"steps": 16.0, "baseline": "Blur"}, {"steps": 16, "baseline": "blur"}),
        ("occlusion", {"max_seconds": "none", "inputs_per_pass": "auto"}, {"max_seconds": None}),
        ("lime", {"segmentation_options": '{"compactness": 20}'}, {"segmentation_options": {"compactness": 20}}),
    ],
)
def test_values_are_converted_from_text_and_json(model, method, options, expected):
    config = cnnscope.get_method(method)(model, **options).config
    assert {key: config[key] for key in expected} == expected


@pytest.mark.parametrize(
    ("method", "options", "message"),
    [
        ("gradcam", {"relu": "no"}, "option relu of gradcam takes true or false; got 'no'"),
        ("gradcam", {"counterfactual": 1}, "option counterfactual of gradcam takes true or false; got 1"),
        ("integrated-gradients", {"steps": "abc"}, "option steps of integrated-gradients takes a whole number >= 1"),
        ("integrated-gradients", {"steps": 0}, r"takes a whole number >= 1 and <= 4096; got 0"),
        ("integrated-gradients", {"inputs_per_pass": -1}, "option inputs_per_pass of integrated-gradients"),
        ("rise", {"masks": 10_000_000}, r"option masks of rise takes a whole number >= 1 and <= 100000"),
        ("rise", {"keep": 0}, r"option keep of rise takes a number > 0 and <= 1; got 0"),
        ("lime", {"samples": 0}, "option samples of lime takes a whole number >= 2"),
        ("lime", {"segments": -1}, "option segments of lime"),
        ("lime", {"segmentation_options": {"bogus": [1]}}, "option segmentation_options of lime: 'bogus' must be"),
        ("smoothgrad", {"base": "gradcam"}, "option base of smoothgrad takes one of: saliency, gradxinput"),
        (
            "occlusion",
            {"fill": "gray"},
            "option fill of occlusion takes one of: grey, mean, blur, zero, noise; got 'gray' "
            r"\(did you mean 'grey'\?\)",
        ),
        ("gradcam", {"reul": True}, "gradcam has no option 'reul'; did you mean 'relu'"),
        ("scorecam", {"masks_per_pass": 4}, "option masks_per_pass of scorecam is now called inputs_per_pass"),
    ],
)
def test_bad_values_get_one_line_naming_the_option_and_its_range(model, method, options, message):
    with pytest.raises(MethodError, match=message) as info:
        cnnscope.get_method(method)(model, **options)
    assert "\n" not in str(info.value)


def test_unknown_segmentation_option_is_a_method_error_not_a_crash(model):
    lime = cnnscope.get_method("lime")(model, segmentation_options={"bogus": 1}, samples=10, quiet=True)
    with pytest.raises(MethodError, match="segmentation_options for slic"):
        lime(torch.rand(1, 3, 32, 32), 0)


def test_every_option_is_declared_with_help_and_a_valid_default(model):
    for row in method_listing():
        cls = cnnscope.get_method(row["name"])
        assert row["summary"], row["name"]
        for name, option in cls.options.items():
            assert option.help and option.kind in ("bool", "int", "float", "choice", "object"), (row["name"], name)
            # the declared default passes the declaration's own check
            assert option.parse(option.default, name, row["name"]) == option.default


def test_methods_command_prints_the_typed_declarations(capsys):
    with pytest.raises(SystemExit) as info:
        main(["methods", "--json"])
    assert info.value.code in (0, None)
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    steps = rows["integrated-gradients"]["options"]["steps"]
    assert steps["type"] == "int" and steps["default"] == 50 and steps["low"] == 1 and steps["help"]
    assert rows["lime"]["file_options"] == ["feature_mask"]
    assert set(rows) == set(cnnscope.list_methods())


def test_cli_option_errors_are_one_line_with_status_2(capsys, tmp_path):
    from cnnscope.samples import sample_image

    image = tmp_path / "cat.png"
    from PIL import Image

    Image.fromarray(sample_image("chelsea")).save(image)
    with pytest.raises(SystemExit) as info:
        main(["explain", str(image), "--method", "ig", "--option", "steps=abc", "-o", str(tmp_path)])
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert err.strip() == (
        "cnnscope: error: option steps of integrated-gradients takes a whole number >= 1 and <= 4096; got 'abc'"
    )


def test_rectified_is_the_deconvnet():
    assert cnnscope.get_method("rectified") is cnnscope.get_method("deconvnet")


def test_the_readme_option_table_is_the_declarations():
    text = README.read_text(encoding="utf-8")
    block = re.search(r"<!-- options:start -->\n(.*?)\n<!-- options:end -->", text, re.S)
    assert block, "the README has no generated option table (cnnscope methods --markdown)"
    expected = markdown_table([(name, cls.options) for name, cls in cnnscope.methods.METHODS.items()])
    assert block.group(1).strip() == expected.strip(), "regenerate it: cnnscope methods --markdown"
    methods_table = text[text.index("| name | what it computes |") :].split("\n\n")[0]
    listed = set(re.findall(r"^\| `([^`]+)`", methods_table, re.M))
    assert listed == set(cnnscope.list_methods())
