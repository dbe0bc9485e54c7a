"""The client side: victim models, datasets, defenses and the DataModules that build observations."""
from .datamodule import (
    AttackInputs,
    FedSGDVictim,
    GroundTruth,
    ObservationFileVictim,
    TensorBatchVictim,
    VictimDataModule,
)
from .defenses import Defense, GaussianNoise, GradientClipping, LaplaceNoise, LowPrecision, TopKPruning
from .models import ConvNet, LeNet, reinitialise, torchvision_classifier
from .tasks import GradientTask, GradientTasks
from .threat_models import FedAvgClient, FedSGDClient, ThreatModelVictim

__all__ = [
    "AttackInputs",
    "Defense",
    "FedSGDVictim",
    "FedAvgClient",
    "FedSGDClient",
    "GaussianNoise",
    "GradientClipping",
    "GradientTask",
    "GradientTasks",
    "LaplaceNoise",
    "LowPrecision",
    "ThreatModelVictim",
    "TopKPruning",
    "GroundTruth",
    "ConvNet",
    "LeNet",
    "ObservationFileVictim",
    "TensorBatchVictim",
    "VictimDataModule",
    "reinitialise",
    "torchvision_classifier",
]
