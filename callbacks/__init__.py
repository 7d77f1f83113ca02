"""Lightning callbacks of lore-pl."""

from callbacks.progress import EpochSummary
from callbacks.protocol import ProtocolEvaluation, evaluate_protocol

__all__ = ["EpochSummary", "ProtocolEvaluation", "evaluate_protocol"]
