"""The registry of memory kinds: the one place that says which kinds exist and where each one's pieces are.

A kind is recorded by name in every run's ``checkpoint.json``. Its entry names, as ``"module:attribute"``
references resolved on first use:

- ``recipes``: the ``memcli train`` subcommands that make a run of it, each a recipe class (memcli/training/);
- ``loader``: run directory -> :class:`memcli.runs.Run` parts (``memcli.runs.load_run`` calls it);
- ``evaluate``: the rows of ``memcli compare checkpoints`` for one run on one data file or directory;
- ``chat``: the chat session for a run (``memcli chat``), and ``chat_type``, its ``--model-type`` name.

The registry is core (memcli/rundir.py reads the names), yet the pieces it names live in layers above
it; references are strings, resolved lazily, so importing it imports nothing of theirs (and keeps the CLI's
start fast). Adding a kind: a package under ``memcli/`` with its ``config.py``, a recipe class, one entry here.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from memcli.errors import MemcliError

EXPLICIT, HIPPO, HRPO = "explicit-memory", "hippo", "hrpo"


@dataclass(frozen=True)
class Kind:
    name: str  # as recorded in checkpoint.json
    label: str  # how messages name a run of it
    recipes: dict[str, str]  # train subcommand -> recipe class; the first makes the kind's main run
    loader: str  # (path, device) -> dict(model=, tok=, info=, ...extras)
    evaluate: str  # (run, data path, num, max_new_tokens) -> {metric: number}
    chat: str  # (run, GenOptions) -> chat session
    chat_type: str  # memcli chat --model-type NAME
    part: str | None = None  # a directory of the kind's that is loadable alone (its config file inside it)
    part_config: str | None = None

    @property
    def train_command(self) -> str:
        return next(iter(self.recipes))


KINDS: dict[str, Kind] = {k.name: k for k in (
    Kind(EXPLICIT, "explicit-memory run",
         recipes={"memory": "memcli.training.explicit:memory_recipe", "router": "memcli.training.explicit:RouterRecipe",
                  "fusion": "memcli.training.explicit:FusionRecipe"},
         loader="memcli.explicit.io:open_run", evaluate="memcli.eval.explicit:compare_rows",
         chat="memcli.chat:explicit_session", chat_type="memory"),
    Kind(HIPPO, "HIPPO run", recipes={"hippo": "memcli.training.hippo:HippoRecipe"},
         loader="memcli.hippo.io:open_run", evaluate="memcli.eval.hippo:compare_rows",
         chat="memcli.chat:hippo_session", chat_type="hippo", part="hippo_model", part_config="hippo_config.json"),
    Kind(HRPO, "HRPO run", recipes={"hrpo": "memcli.training.hrpo:HrpoRecipe"},
         loader="memcli.hrpo.io:open_run", evaluate="memcli.eval.hrpo:compare_rows",
         chat="memcli.chat:hrpo_session", chat_type="hrpo"),
)}


def get(name: str) -> Kind:
    if name not in KINDS:
        raise MemcliError(f"unknown memory kind '{name}', expected one of {', '.join(KINDS)}")
    return KINDS[name]


def of_recipe(recipe: str) -> Kind:
    """The kind a ``memcli train RECIPE`` run is."""
    for k in KINDS.values():
        if recipe in k.recipes:
            return k
    raise MemcliError(f"unknown recipe '{recipe}', expected one of {', '.join(recipes())}")


def of_chat_type(model_type: str) -> Kind | None:
    return next((k for k in KINDS.values() if k.chat_type == model_type), None)


def recipes() -> list[str]:
    return [r for k in KINDS.values() for r in k.recipes]


def resolve_ref(ref: str):
    """``"package.module:attribute"`` -> the object."""
    mod, _, attr = ref.partition(":")
    return getattr(importlib.import_module(mod), attr)


def recipe_class(recipe: str):
    return resolve_ref(of_recipe(recipe).recipes[recipe])
