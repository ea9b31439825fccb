"""What every ``memcli train`` recipe is: a class with named phases that the one loop (loop.py) drives.

The loop calls, in order::

    recipe.setup()                 build_model(), then build_data() (checks ran when the config was resolved)
    recipe.plan(plan)              the loop's world size, steps per epoch and total steps, once
    recipe.load_state_dict(...)    on resume
    per micro-batch:  batch = recipe.collate(items, micro);  loss, metrics = recipe.step(model, batch, step)
    per optimizer step:  recipe.after_step(step);  recipe.evaluate(step) every eval_interval
    recipe.evaluate(step, final=True);  recipe.save(run_dir, info)

``model`` in ``step`` is the prepared model (wrapped for DDP when launched so): a recipe's forward goes
through it, or its gradients would not be synchronised. A recipe sets ``model``, ``param_groups`` and
``train_items`` in its build phases; the defaults below are what a recipe without that need does.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from memcli.training.state import trainable_io


@dataclass(frozen=True)
class Plan:
    """The loop's sizes, decided once from the data and the launch (only the loop reads the world size)."""

    world: int  # processes
    rank: int
    per_epoch: int  # micro-batches per epoch on each rank (the ragged tail of the data is dropped)
    total_micro: int
    total_steps: int  # optimizer steps
    accumulation: int

    def step_of_epochs(self, epochs: float) -> int:
        """The optimizer step at which ``epochs`` epochs (fractions allowed) have passed."""
        return int(epochs * self.per_epoch) // self.accumulation


class Recipe(ABC):
    command = "train"  # how messages and trackers name it
    kind = ""  # memcli.kinds name of the run it writes ("" for a run that is not loadable, e.g. a baseline)
    default_run_name = "run"

    model: torch.nn.Module
    param_groups: list[dict]  # {"name", "params", "lr"}
    train_items: list

    def __init__(self, cfg: Any):
        """``cfg``: the recipe's schema (memcli/config.py), resolved and checked here, before any data or model work."""
        cfg.resolve()
        cfg.validate()
        self.cfg = cfg

    # ---- phases
    def setup(self) -> None:
        self.build_model()
        self.build_data()

    @abstractmethod
    def build_model(self) -> None:
        """Set ``model`` and ``param_groups`` (what trains, at which learning rate)."""

    @abstractmethod
    def build_data(self) -> None:
        """Set ``train_items`` (and whatever the recipe evaluates on)."""

    def plan(self, plan: Plan) -> None:
        t = self.cfg.training
        self.sizes = plan
        # items per evaluation during training and at the end (None: all)
        self.eval_n, self.final_n = t.eval_num_samples or None, t.final_eval_num_samples

    @abstractmethod
    def collate(self, items: list, micro: int) -> dict:
        """A batch of ``items`` for micro-batch ``micro`` (tensors are moved to the device by the loop)."""

    @abstractmethod
    def step(self, model: torch.nn.Module, batch: dict, step: int) -> tuple[torch.Tensor, dict]:
        """(loss, metrics) of one micro-batch, computed through ``model`` (the prepared one)."""

    def after_step(self, step: int) -> None:
        pass

    @property
    def has_eval(self) -> bool:
        return False

    def evaluate(self, step: int, final: bool = False) -> dict:
        return {}

    def save(self, out: Path, info: dict) -> None:
        pass

    # ---- what a resumable state holds
    def trainable(self) -> dict[str, torch.Tensor]:
        """Named trainable tensors (saved in every state)."""
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._io()[0]()

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        self._io()[1](sd)

    def _io(self):
        if not hasattr(self, "_trainable_io"):
            self._trainable_io = trainable_io(self.trainable())  # names fixed at the first use (before training)
        return self._trainable_io

    def extra_state(self) -> dict[str, torch.Tensor]:
        """Tensors besides the trainable ones that a resumed run needs (buffers the recipe changes)."""
        return {}

    def load_extra_state(self, sd: dict[str, torch.Tensor]) -> None:
        pass

    def sync_state(self) -> None:
        """Collective, on every rank before a save: bring per-rank statistics DDP does not sync together."""

    def tokens_in(self, batch: dict) -> int:
        return int(batch["attention_mask"].sum()) if "attention_mask" in batch else 0

    def info(self) -> dict:
        """Fields of checkpoint.json besides the loop's own."""
        return {"kind": self.kind} if self.kind else {}

    def run_dir(self) -> Path:
        lg = self.cfg.logging
        return Path(lg.out_dir) / (lg.run_name or self.default_run_name)

    def result(self, res: dict) -> dict:
        """The loop's result, with what the recipe adds (the summary ``memcli train`` prints)."""
        return res

