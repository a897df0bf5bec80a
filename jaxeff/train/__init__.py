"""Training: functional train step, optimizers, schedules, Orbax checkpoints."""

from jaxeff.train.checkpoint import Checkpointer
from jaxeff.train.step import (
    OptimConfig,
    TrainState,
    init_train_state,
    lr_schedule,
    make_optimizer,
    make_train_step,
    merge,
    next_token_loss,
)

__all__ = ["Checkpointer", "OptimConfig", "TrainState", "init_train_state", "lr_schedule", "make_optimizer",
           "make_train_step", "merge", "next_token_loss"]
