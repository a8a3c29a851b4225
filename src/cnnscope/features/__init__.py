"""What the network has learned, apart from one prediction: activation maximization, Deep Dream,
filters, activations, the architecture diagram and class impressions."""

from .impressions import Impressions, class_impressions, salient_regions
from .maximization import Visualization, gram_similarity, maximize, total_variation
from .objectives import Objective, channel, class_logit, layer_activation, neuron, parse_objective
from .transforms import Transforms

__all__ = [
    "Impressions",
    "Objective",
    "Transforms",
    "Visualization",
    "channel",
    "class_impressions",
    "class_logit",
    "gram_similarity",
    "layer_activation",
    "maximize",
    "neuron",
    "parse_objective",
    "salient_regions",
    "total_variation",
]
