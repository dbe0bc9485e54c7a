"""lightning_gi: gradient inversion attacks as PyTorch Lightning modules."""
from .observation import GradientObservation, ObservationError, capture_observation, client_gradients

__version__ = "0.1.0"
__all__ = ["GradientObservation", "ObservationError", "capture_observation", "client_gradients", "__version__"]
