"""The client side: victim models, datasets, defenses and the DataModules that build observations."""
from .datamodule import (
    AttackInputs,
    FedSGDVictim,
    GroundTruth,
    ObservationFileVictim,
    TensorBatchVictim,
    VictimDataModule,
)
from .defenses import Defense, GaussianNoise
from .models import LeNet, reinitialise, torchvision_classifier

__all__ = [
    "AttackInputs",
    "Defense",
    "FedSGDVictim",
    "GaussianNoise",
    "GroundTruth",
    "LeNet",
    "ObservationFileVictim",
    "TensorBatchVictim",
    "VictimDataModule",
    "reinitialise",
    "torchvision_classifier",
]
