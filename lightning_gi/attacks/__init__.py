"""Attacks: one LightningModule per family, sharing :class:`GradientInversionAttack`."""
from .base import GradientInversionAttack
from .dlg import DLG, IDLG

__all__ = ["GradientInversionAttack", "DLG", "IDLG"]
