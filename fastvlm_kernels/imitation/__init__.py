"""The imitation network (the paper's drafter), its losses, data and trainer, and the exit-layer chooser."""
from .data import DataError, Encoder, Example, load_examples
from .exit_layer import ExitLayerReport, pick_exit_layer
from .losses import LossWeights, cosine_loss, distillation_loss, imitation_loss
from .network import ImitationConfig, ImitationNetwork
from .trainer import TrainConfig, TrainResult, train_imitation

__all__ = ["ImitationConfig", "ImitationNetwork", "TrainConfig", "TrainResult", "train_imitation", "LossWeights",
           "cosine_loss", "distillation_loss", "imitation_loss", "DataError", "Encoder", "Example", "load_examples",
           "ExitLayerReport", "pick_exit_layer"]
