"""The architecture diagram: short enough to read, true to the model's calls, shapes and parameters."""

import io
import xml.etree.ElementTree as ET

import numpy as np
from PIL import Image
from torch import nn

from cnnscope import Model, architecture


def test_default_model_collapses_its_blocks(default_model):
    diagram = architecture(default_model)
    assert diagram.layers == 199 and len(diagram.nodes) <= 20
    assert sum(node.params for node in diagram.nodes) == diagram.total_params == 4_652_008
    by_first = {node.first: node for node in diagram.nodes}
    stage = by_first["_blocks.11"]
    assert (stage.last, stage.kind, stage.repeat, stage.output_shape) == ("_blocks.14", "MBConvBlock", 4, (192, 7, 7))
    # the shared activation shows up twice, at the stem and at the head
    keys = [node.first for node in diagram.nodes]
    assert keys.index("_swish@0") < keys.index("_blocks.0") < keys.index("_swish@1")
    opened = architecture(default_model, depth=2)  # the MBConv blocks opened into their layers
    assert len(opened.nodes) > 30 and sum(node.params for node in opened.nodes) == diagram.total_params
    assert opened.nodes[0].first == "_conv_stem"  # a convolution with a padding child stays one box
    svg = diagram.svg()
    root = ET.fromstring(svg)
    texts = [element.text for element in root.iter("{http://www.w3.org/2000/svg}text")]
    assert "MBConvBlock  x4" in texts and "192 x 7 x 7" in texts
    picture = np.asarray(Image.open(io.BytesIO(diagram.png())).convert("L"))
    assert picture.std() > 10


def test_a_deep_network_fits_on_a_page():
    def stage(channels_in, channels, blocks):
        layers = [nn.Conv2d(channels_in, channels, 3, stride=2, padding=1)]
        for _ in range(blocks):
            layers += [nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU()]
        return nn.Sequential(*layers)

    net = nn.Sequential(
        stage(3, 8, 25), stage(8, 16, 25), stage(16, 32, 25), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)
    )
    diagram = architecture(Model(net))
    assert diagram.layers > 220
    assert len(diagram.nodes) == 9, [node.label for node in diagram.nodes]
    repeated = [node for node in diagram.nodes if node.repeat > 1]
    assert [node.label for node in repeated] == ["Conv2d > BatchNorm2d > ReLU  x25"] * 3
    assert [node.output_shape for node in repeated] == [(8, 112, 112), (16, 56, 56), (32, 28, 28)]
    assert sum(node.params for node in diagram.nodes) == sum(p.numel() for p in net.parameters())
    flat = architecture(Model(net), collapse=False)
    assert len(flat.nodes) == 3 * 76 + 3
