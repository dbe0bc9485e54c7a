"""The client side: victim models, datasets, defenses, and the ONE victim DataModule (:class:`Victim`) with its
pluggable sources (:mod:`lightning_gi.victim.sources`)."""
from .datamodule import (
    AttackInputs,
    FedSGDVictim,
    GroundTruth,
    ObservationFileVictim,
    TensorBatchVictim,
    Victim,
    VictimDataModule,
)
from .defenses import Defense, GaussianNoise, GradientClipping, LaplaceNoise, LowPrecision, TopKPruning
from .models import ConvNet, LeNet, reinitialise, torchvision_classifier
from .sources import BatchSource, DatasetImages, ObservationFile, TensorImages, VictimSource
from .tasks import GradientTask, GradientTasks
from .threat_models import FedAvgClient, FedSGDClient, ThreatModelVictim

__all__ = [
    "AttackInputs",
    "BatchSource",
    "DatasetImages",
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
    "ObservationFile",
    "ObservationFileVictim",
    "TensorBatchVictim",
    "TensorImages",
    "Victim",
    "VictimDataModule",
    "VictimSource",
    "reinitialise",
    "torchvision_classifier",
]
