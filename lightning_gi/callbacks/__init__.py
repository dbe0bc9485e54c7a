"""Callbacks: output writing, monitoring, divergence recovery and loss schedules."""
from .guard import DivergenceGuard
from .monitor import ReconstructionMonitor
from .report import ReconstructionReport, comparison_grid
from .schedules import GradientDropout, PriorSchedule, PriorSwitch, StepwiseGradientSchedule

__all__ = ["DivergenceGuard", "ReconstructionMonitor", "ReconstructionReport", "comparison_grid",
           "StepwiseGradientSchedule", "GradientDropout", "PriorSchedule", "PriorSwitch"]
