"""Lightning callbacks of lore-pl."""

from callbacks.figures import BasisFigures
from callbacks.progress import EpochSummary
from callbacks.protocol import ProtocolEvaluation, evaluate_protocol
from callbacks.score_writer import ScoreWriter

__all__ = ["BasisFigures", "EpochSummary", "ProtocolEvaluation", "ScoreWriter", "evaluate_protocol"]
