"""Bridges from FL frameworks to lightning_gi: capture real client updates as observation files.

- :mod:`lightning_gi.integrations.capture`: framework-independent (weight delta + server config -> observation,
  BN batch statistics from shared running statistics).
- :mod:`lightning_gi.integrations.flower`: Flower strategies (needs the ``[flower]`` extra).
"""
from .audit_models import AuditCNN
from .capture import HyperparameterKeys, UpdateRecorder, recover_bn_statistics

__all__ = ["AuditCNN", "HyperparameterKeys", "UpdateRecorder", "recover_bn_statistics"]
