"""Lightning callbacks of lore-pl."""

from callbacks.figures import BasisFigures
from callbacks.progress import EpochSummary
from callbacks.protocol import ProtocolEvaluation, evaluate_protocol

__all__ = ["BasisFigures", "EpochSummary", "ProtocolEvaluation", "evaluate_protocol"]
