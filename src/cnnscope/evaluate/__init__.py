"""Does an explanation tell the truth? Metrics take maps (any method's, or a user's), not methods.

- :mod:`.faithfulness`: deletion / insertion curves, remove-the-evidence and keep-only-the-evidence;
- :mod:`.road`: ROAD, removal by noisy linear imputation (most- and least-relevant first);
- :mod:`.metrics`: pointing game (TorchRay's protocol), energy in the object, Gini sparsity, constant maps,
  and the centre / random baseline maps;
- :mod:`.sanity`: model randomization (cascading and independent) and data randomization checks;
- :mod:`.run`: :func:`evaluate`, every method x every metric on a dataset, and :mod:`.demo` on synthetic
  shapes with known masks; :mod:`.report` writes the HTML report.
"""

from .demo import demo_evaluate, markdown_table
from .faithfulness import Curve, deletion_curve, insertion_curve, keep_evidence, remove_evidence
from .metrics import energy_in_mask, gini, is_constant, pointing_game
from .report import write_report
from .road import impute
from .run import Evaluation, evaluate, score_maps
from .sanity import data_randomization, model_randomization, randomization_stages, similarity

__all__ = [
    "Curve",
    "Evaluation",
    "data_randomization",
    "deletion_curve",
    "demo_evaluate",
    "energy_in_mask",
    "evaluate",
    "gini",
    "impute",
    "insertion_curve",
    "is_constant",
    "keep_evidence",
    "markdown_table",
    "model_randomization",
    "pointing_game",
    "randomization_stages",
    "remove_evidence",
    "score_maps",
    "similarity",
    "write_report",
]
