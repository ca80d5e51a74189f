"""Training: the CIFAR trainer, its config, recipes and presets, checkpoints."""
from gradflow.runs.checkpoint import load_checkpoint, save_checkpoint
from gradflow.training.config import TrainConfig, make_config
from gradflow.training.loop import RunOutcome, TrainingDiverged, resume_config, run_training, train
from gradflow.training.presets import RECIPES, LrSchedule, describe_presets, get_preset, lr_schedule, presets, resolve, schedule

__all__ = ["TrainConfig", "make_config", "train", "run_training", "RunOutcome", "resume_config",
           "TrainingDiverged",
           "load_checkpoint", "save_checkpoint", "RECIPES", "presets", "get_preset", "resolve",
           "lr_schedule", "LrSchedule", "describe_presets"]
