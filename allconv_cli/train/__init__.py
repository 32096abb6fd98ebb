"""The trainer shared by train, ablate and benchmark: the settings declared once (``config``),
checked and layered (``settings``), optimizers and schedules (``optim``), what a run trains and
what a step touches (``learner``), the one step (``step``), the epoch loop (``loop``), the run
folder (``run_folder``) and the run (``run``).

The names below load their module on first use, so that ``allconv --help`` can read ``config``
without importing torch.
"""

from allconv_cli.util import lazy_attributes

# Public name -> the submodule that defines it.
_API = {
    "Learner": "learner", "Setup": "learner", "make_learner": "learner",
    "ClassReluShut": "loop", "Position": "loop", "TrainingDiverged": "loop", "TrainingStopped": "loop", "finished": "loop", "fit": "loop",
    "TIME_LIMIT": "run", "build": "run", "default_run_dir": "run", "resume": "run", "train": "run",
    "RESUME_MAY_CHANGE": "run_folder", "RunFolder": "run_folder", "load_run_config": "run_folder",
    "TrainConfig": "config", "resolve": "settings",
    "batch_inputs": "step", "train_step": "step",
}

__all__ = sorted(_API)


__getattr__, __dir__ = lazy_attributes(__name__, _API)
