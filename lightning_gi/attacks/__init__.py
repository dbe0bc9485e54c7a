"""Attacks: one LightningModule per family, sharing :class:`GradientInversionAttack`."""
from .base import GradientInversionAttack
from .dlg import DLG, IDLG
from .image_prior import ImagePriorAttack
from .inverting import GradInversion, InvertingGradients
from .wdlg import WDLG

__all__ = ["GradientInversionAttack", "DLG", "IDLG", "ImagePriorAttack", "InvertingGradients", "GradInversion", "WDLG"]
