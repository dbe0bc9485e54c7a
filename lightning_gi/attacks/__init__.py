"""Attacks: one LightningModule per family, sharing :class:`GradientInversionAttack`."""
from .. import distributed as _distributed  # noqa: F401  registers the gi_shard / gi_restarts strategies
from .base import GradientInversionAttack
from .dlg import DLG, IDLG
from .fedavg import FedAvgDLG, FedAvgIDLG
from .gias import GIAS
from .giml import GIML, GradientTasks
from .image_prior import ImagePriorAttack
from .inverting import GradInversion, InvertingGradients
from .stepwise import StepwiseInversion
from .vectorised import VectorisedInvertingGradients, VectorisedRestartsAttack
from .wdlg import WDLG

__all__ = [
    "GradientInversionAttack",
    "DLG",
    "IDLG",
    "FedAvgDLG",
    "FedAvgIDLG",
    "GIAS",
    "GIML",
    "GradientTasks",
    "ImagePriorAttack",
    "InvertingGradients",
    "GradInversion",
    "StepwiseInversion",
    "VectorisedRestartsAttack",
    "VectorisedInvertingGradients",
    "WDLG",
]
