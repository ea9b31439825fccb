"""Generated multi-turn dialogs for HIPPO: a fact is stated early and asked about later."""

from __future__ import annotations

import random

from memcli.data.knowledge import invent_word
from memcli.errors import MemcliError

# attribute -> (statement template, query, value generator key)
ATTRIBUTES = {
    "pet's name": ("My pet's name is {v}.", "What is my pet's name?", "name"),
    "best friend": ("My best friend is called {v}.", "What is my best friend called?", "name"),
    "hometown": ("I grew up in {v}.", "Where did I grow up?", "place"),
    "lucky number": ("My lucky number is {v}.", "What is my lucky number?", "number"),
    "birthday": ("My birthday is on {v}.", "When is my birthday?", "date"),
    "favourite colour": ("My favourite colour is {v}.", "What is my favourite colour?", "colour"),
    "favourite food": ("I love eating {v} more than anything.", "What food do I love most?", "food"),
    "car": ("I drive a {v}.", "What car do I drive?", "name"),
    "boss": ("My boss is named {v}.", "What is my boss named?", "name"),
    "street": ("I live on {v} Street.", "Which street do I live on?", "name"),
}

_COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "teal", "silver", "gold", "black", "white", "pink"]
_FOODS = ["noodles", "pancakes", "curry", "sushi", "tacos", "dumplings", "risotto", "falafel", "lasagna", "paella"]
_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December"]

NOISE = [
    "I went for a long walk this morning.",
    "The weather has been strange lately.",
    "I am thinking about reading more books.",
    "Work was busy today, lots of meetings.",
    "I tried a new coffee shop yesterday.",
    "My phone battery keeps dying.",
    "I watched a documentary about the ocean.",
    "We might go hiking at the weekend.",
    "I need to clean the kitchen tonight.",
    "The train was late again this morning.",
    "I started learning to cook new dishes.",
    "My neighbour is renovating the house.",
]


REPLIES = ["Got it.", "Thanks for telling me.", "Good to know.", "I will remember that.", "Okay, noted.",
           "That sounds nice.", "I see.", "Interesting!"]

POOL_SEED = 20_251_122  # names of a pool are the same for every split and seed


def name_pools(size: int) -> dict[str, list[str]]:
    """Fixed pools of ``size`` distinct invented names and places (0: no pool, every mention is new)."""
    if size <= 0:
        return {}
    rng = random.Random(POOL_SEED)
    out = {}
    for kind, syl in (("name", (2, 2)), ("place", (2, 3))):
        seen: dict[str, None] = {}
        while len(seen) < size:
            seen.setdefault(invent_word(rng, syl))
        out[kind] = list(seen)
    return out


def _value(kind: str, rng: random.Random, pools: dict | None = None) -> str:
    if pools and kind in pools:
        return rng.choice(pools[kind])
    if kind == "name":
        return invent_word(rng, (2, 2))
    if kind == "place":
        return invent_word(rng, (2, 3))
    if kind == "number":
        return str(rng.randint(10, 99))
    if kind == "date":
        return f"{rng.choice(_MONTHS)} {rng.randint(1, 28)}"
    if kind == "colour":
        return rng.choice(_COLOURS)
    return rng.choice(_FOODS)


def generate_dialogs(n: int, seed: int, turns: int = 6, min_distance: int = 2, facts_per_dialog: int = 2,
                     noise_prob: float = 0.5, name_pool: int = 0, min_turns: int | None = None,
                     assistant_prob: float = 0.0) -> list[dict]:
    """``n`` dialogs of ``turns`` user turns; the asked fact is at least ``min_distance`` turns before the end.

    Turns are ``{"role", "content"}`` objects; with ``assistant_prob`` a user turn is followed by a short
    assistant reply with that probability (a chat writes both sides into the memory state).

    Other turns state other attributes (distractors) or small talk, so the answer is only in the
    asked turn. Names and places are invented afresh for every mention (the model must copy them),
    or drawn from a fixed pool of ``name_pool`` (recall among known names, chance 1/name_pool).
    With ``min_turns`` each dialog's length is drawn from ``[min_turns, turns]`` (a curriculum: short
    dialogs teach reading the state, long ones choosing among turns); distance and the number of
    facts shrink to fit a short dialog. Deterministic for a seed.
    """
    min_turns = turns if min_turns is None else min_turns
    if not 1 <= min_turns <= turns:
        raise MemcliError(f"--min-turns got {min_turns}, expected 1 <= min-turns <= turns ({turns})")
    if name_pool < 0:
        raise MemcliError(f"--name-pool got {name_pool}, expected 0 (no pool) or a positive integer")
    pools = name_pools(name_pool)
    if n < 1:
        raise MemcliError(f"--num got {n}, expected a positive integer")
    if turns < 1:
        raise MemcliError(f"--turns got {turns}, expected a positive integer")
    if not 0 <= min_distance < turns:
        raise MemcliError(f"--min-distance got {min_distance}, expected 0 <= min-distance < turns ({turns})")
    if not 0.0 <= assistant_prob <= 1.0:
        raise MemcliError(f"--assistant-turns got {assistant_prob}, expected a probability in [0, 1]")
    if facts_per_dialog < 1 or facts_per_dialog > min(turns, len(ATTRIBUTES)):
        raise MemcliError(f"--facts-per-dialog got {facts_per_dialog}, expected 1..{min(turns, len(ATTRIBUTES))}")
    rng = random.Random(seed)
    names = list(ATTRIBUTES)
    rows = []
    max_turns = turns
    for _ in range(n):
        turns = rng.randint(min_turns, max_turns) if min_turns < max_turns else max_turns
        attrs = rng.sample(names, min(facts_per_dialog, turns))
        asked = attrs[0]
        # the asked fact goes into a turn at least min_distance before the end
        ask_pos = rng.randint(0, turns - 1 - min(min_distance, turns - 1))
        other_pos = [p for p in range(turns) if p != ask_pos]
        rng.shuffle(other_pos)
        history = [None] * turns
        history[ask_pos] = ATTRIBUTES[asked][0].format(v=(answer := _value(ATTRIBUTES[asked][2], rng, pools)))
        for a, p in zip(attrs[1:], other_pos):
            history[p] = ATTRIBUTES[a][0].format(v=_value(ATTRIBUTES[a][2], rng, pools))
        spare = [a for a in names if a not in attrs]
        for p in range(turns):
            if history[p] is None:
                if rng.random() < noise_prob or not spare:
                    history[p] = rng.choice(NOISE)
                else:
                    a = spare.pop(rng.randrange(len(spare)))
                    history[p] = ATTRIBUTES[a][0].format(v=_value(ATTRIBUTES[a][2], rng, pools))
        dialog = []
        for p, text in enumerate(history):
            dialog.append({"role": "user", "content": text})
            if assistant_prob and rng.random() < assistant_prob:
                dialog.append({"role": "assistant", "content": rng.choice(REPLIES)})
        rows.append({
            "dialog_history": dialog,
            "memory_query": ATTRIBUTES[asked][1],
            "memory_answer": answer,
            "distance": turns - ask_pos,
        })
    return rows
