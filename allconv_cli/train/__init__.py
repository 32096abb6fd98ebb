"""The trainer shared by train, ablate and benchmark: settings (``settings``), optimizers and
schedules (``optim``), what a run trains and what a step touches (``learner``), the one step
(``step``), the epoch loop (``loop``), the run folder (``run_folder``) and the run (``run``)."""

from allconv_cli.train.learner import Learner, Setup, make_learner
from allconv_cli.train.loop import (
           Position,
           TrainingDiverged,
           TrainingStopped,
           finished,
           fit,
)
from allconv_cli.train.run import build, default_run_dir, resume, train
from allconv_cli.train.run_folder import RESUME_MAY_CHANGE, RunFolder, load_run_config
from allconv_cli.train.settings import TrainConfig, resolve
from allconv_cli.train.step import batch_inputs, train_step

__all__ = ["Learner", "Position", "RESUME_MAY_CHANGE", "RunFolder", "Setup", "TrainConfig", "TrainingDiverged",
           "TrainingStopped", "batch_inputs", "build", "default_run_dir", "finished", "fit", "load_run_config",
           "make_learner", "resolve", "resume", "train", "train_step"]
