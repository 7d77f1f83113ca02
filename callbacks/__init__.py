"""Lightning callbacks of lore-pl (layer 4: they may use the LightningModules and the data modules)."""

from callbacks.basis_export import BasisExport
from callbacks.best import RestoreBestCheckpoint
from callbacks.figures import BasisFigures
from callbacks.progress import EpochSummary
from callbacks.protocol import ProtocolEvaluation, evaluate_protocol
from lore_pl.modules.scoring import ScoreWriter  # installed by ScoringModule itself

__all__ = ["BasisExport", "BasisFigures", "EpochSummary", "ProtocolEvaluation", "RestoreBestCheckpoint", "ScoreWriter",
           "evaluate_protocol"]
