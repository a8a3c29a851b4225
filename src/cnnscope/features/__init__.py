"""What the network has learned, apart from one prediction: activation maximization, Deep Dream,
filters, activations and the architecture diagram."""

from .maximization import Visualization, gram_similarity, maximize, total_variation
from .objectives import Objective, channel, class_logit, layer_activation, neuron, parse_objective
from .transforms import Transforms

__all__ = [
    "Objective",
    "Transforms",
    "Visualization",
    "channel",
    "class_logit",
    "gram_similarity",
    "layer_activation",
    "maximize",
    "neuron",
    "parse_objective",
    "total_variation",
]
