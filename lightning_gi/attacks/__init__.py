"""Attacks: one LightningModule per family, sharing :class:`GradientInversionAttack`."""
from .base import GradientInversionAttack
from .dlg import DLG, IDLG
from .fedavg import FedAvgDLG, FedAvgIDLG
from .gias import GIAS
from .giml import GIML, GradientTasks
from .image_prior import ImagePriorAttack
from .inverting import GradInversion, InvertingGradients, VectorisedInvertingGradients, VectorisedRestartsAttack
from .stepwise import StepwiseInversion
from .update_rules import QuantisedSign, RawGradient, SignedGradient, UpdateRule
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
    "QuantisedSign",
    "RawGradient",
    "SignedGradient",
    "UpdateRule",
    "VectorisedRestartsAttack",
    "VectorisedInvertingGradients",
    "WDLG",
]
