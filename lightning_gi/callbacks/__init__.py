"""Callbacks: output writing, monitoring, and (later) loss schedules."""
from .monitor import ReconstructionMonitor
from .report import ReconstructionReport, comparison_grid

__all__ = ["ReconstructionMonitor", "ReconstructionReport", "comparison_grid"]
