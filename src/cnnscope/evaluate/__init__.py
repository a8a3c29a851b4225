"""Does an explanation tell the truth? Metrics take maps (any method's, or a user's), not methods."""

from .faithfulness import Curve, deletion_curve, insertion_curve, keep_evidence, remove_evidence

__all__ = ["Curve", "deletion_curve", "insertion_curve", "keep_evidence", "remove_evidence"]
