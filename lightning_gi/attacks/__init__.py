"""Attacks: one LightningModule per family, sharing :class:`GradientInversionAttack`."""
from .base import GradientInversionAttack
from .dlg import DLG, IDLG
from .gias import GIAS
from .giml import GIML, GradientTasks
from .image_prior import ImagePriorAttack
from .inverting import GradInversion, InvertingGradients
from .wdlg import WDLG
from .stepwise import StepwiseInversion
from .vectorised import VectorisedInvertingGradients, VectorisedRestartsAttack
from .. import distributed as _distributed  # noqa: F401  registers the gi_shard / gi_restarts strategies

__all__ = ["GradientInversionAttack", "DLG", "IDLG", "ImagePriorAttack", "InvertingGradients", "GradInversion", "WDLG", "StepwiseInversion",
           "VectorisedRestartsAttack", "VectorisedInvertingGradients"]
