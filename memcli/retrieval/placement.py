"""Where retrieved text is written into a prompt: the one function both memories read through.

A chat model looks for the context of its answer inside the conversation, not before it. Four placements:

- ``prefix``: the entries, a newline, then the whole prompt (chat template included): before release 4 the only
  read, and still the one for a cloze prompt (plain text, no template), where it is the natural place;
- ``system``: in the system message, after the template's default one (``"<default>.\\n\\n<entries>"``), or as a
  system message of its own when the template writes none;
- ``user_before``: inside the last user message, before the question (``"<entries>\\n<question>"``);
- ``user_after``: inside the last user message, after the question (``"<question>\\n<entries>"``): the default,
  measured best on the recipe's run (README).

A prompt is given as token ids (what the memories and the evaluation work with). For any placement but
``prefix``, the ids are decoded to the template's text (special tokens kept, no clean-up: an exact round trip for
the byte-level BPE tokenizers memcli supports), the context is written into it, and the text is tokenised again:
the model sees exactly what it would if the user had typed the context there. A prompt that holds no user turn
of the template (a cloze) is read with ``prefix`` whatever the placement. The template's parts (user header, end
of a turn, system header, default system message) are found once per tokenizer by rendering small conversations.
"""

from __future__ import annotations

from dataclasses import dataclass

from memcli.errors import MemcliError

PLACEMENTS = ("prefix", "system", "user_before", "user_after")
LEGACY = "prefix"  # a run that records no placement was read this way


@dataclass(frozen=True)
class Layout:
    """The text parts of one tokenizer's chat template (None: the template has no such part)."""

    user_header: str  # what precedes a user message's content, from the end of the previous turn
    turn_end: str  # what ends a message's content (e.g. "<|im_end|>")
    system_header: str | None  # what precedes a system message's content
    system_footer: str | None  # what follows it, up to the first user header
    default_system: str  # the system message the template writes when given none ("" when none)


_LAYOUTS: dict = {}


def layout(tok) -> Layout:
    key = (id(tok), tok.chat_template)
    if key not in _LAYOUTS:
        _LAYOUTS[key] = _find_layout(tok)
    return _LAYOUTS[key]


def _render(tok, msgs: list[dict], gen: bool = False) -> str:
    return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)


def _common_suffix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
        n += 1
    return a[len(a) - n:]


def _common_prefix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


def _find_layout(tok) -> Layout:
    if not getattr(tok, "chat_template", None):
        raise MemcliError("this tokenizer has no chat template: only placement 'prefix' can be used")
    u, a, v, s = "\x01U\x01", "\x01A\x01", "\x01V\x01", "\x01S\x01"  # markers no template writes
    one = _render(tok, [{"role": "user", "content": u}])
    two = _render(tok, [{"role": "user", "content": u}, {"role": "assistant", "content": a},
                        {"role": "user", "content": v}])
    ended = _render(tok, [{"role": "user", "content": u}], gen=False)
    turn_end = ended[ended.index(u) + len(u):]
    header = _common_suffix(one[: one.index(u)], two[two.index(a) + len(a): two.index(v)])
    if turn_end and header.startswith(turn_end):  # the turn before (a default system message) ended there
        header = header[len(turn_end):]
    if not header or not turn_end:
        raise MemcliError("could not find the user turn in this tokenizer's chat template")
    sys_header = sys_footer = None
    default = ""
    try:
        with_sys = _render(tok, [{"role": "system", "content": s}, {"role": "user", "content": u}])
    except Exception:  # a template that refuses system messages
        with_sys = ""
    if s in with_sys:
        sys_header = with_sys[: with_sys.index(s)]
        sys_footer = with_sys[with_sys.index(s) + len(s): with_sys.index(u) - len(header)]
        before = one[: one.index(u) - len(header)]  # what the template writes before the first user turn unasked
        if sys_header and before.startswith(sys_header) and before.endswith(sys_footer):
            default = before[len(sys_header): len(before) - len(sys_footer)]
    return Layout(header, turn_end, sys_header, sys_footer, default)


def chat_prompt_ids(tok, text: str) -> list[int]:
    """``text`` as the user's message in the tokenizer's chat template (its default system message included), then
    the assistant's header: how a chat model is asked."""
    out = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=True, add_generation_prompt=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def decode(tok, ids: list[int]) -> str:
    """Token ids back to the exact text they were made from (special tokens kept, spaces as they were)."""
    return tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def encode(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def check(placement: str, where: str = "placement") -> str:
    if placement not in PLACEMENTS:
        raise MemcliError(f"{where} '{placement}': expected one of {', '.join(PLACEMENTS)}")
    return placement


def user_span(tok, text: str) -> tuple[int, int] | None:
    """Character span of the last user message's content in a rendered prompt, or None (no user turn: a cloze)."""
    lay = layout(tok) if getattr(tok, "chat_template", None) else None
    if lay is None:
        return None
    start = text.rfind(lay.user_header)
    if start < 0:
        return None
    start += len(lay.user_header)
    end = text.find(lay.turn_end, start)
    return start, (len(text) if end < 0 else end)


def question_text(tok, prompt_ids: list[int]) -> str:
    """What the user asked: the last user message's content of a chat prompt, or the whole text of a cloze."""
    text = decode(tok, prompt_ids)
    span = user_span(tok, text)
    return text if span is None else text[span[0]: span[1]]


def place_text(tok, text: str, context: str, placement: str, sep: str = "\n") -> str | None:
    """``text`` (a rendered chat prompt) with ``context`` written in at ``placement``; None when the prompt has no
    user turn (the caller reads it as a prefix). ``sep`` joins the context and the question (user placements)."""
    span = user_span(tok, text)
    if span is None:
        return None
    start, end = span
    if placement == "user_before":
        return text[:start] + context + sep + text[start:]
    if placement == "user_after":
        return text[:end] + sep + context + text[end:]
    lay = layout(tok)
    if lay.system_header is None:  # no system role: the nearest the template has is the user message
        return text[:start] + context + sep + text[start:]
    at = text.find(lay.system_header)
    if 0 <= at < start:  # a system message is there: the context goes after its content
        close = text.find(lay.system_footer, at + len(lay.system_header))
        content = text[at + len(lay.system_header): close]
        glue = "\n\n" if not content or content.rstrip()[-1:] in ".!?:" else ".\n\n"
        return text[:close] + (glue if content else "") + context + text[close:]
    first_user = text.find(lay.user_header)  # none: a system message of its own before the conversation
    return text[:first_user] + lay.system_header + context + lay.system_footer + text[first_user:]


def place(tok, prompt_ids: list[int], context_ids: list[list[int]], placement: str, sep_ids: list[int],
          sep: str = "\n") -> list[int]:
    """``prompt_ids`` with the entries ``context_ids`` (token ids, one list per entry, in reading order) written in at
    ``placement``. ``prefix``, and any prompt without a user turn, keep the token-level prefix read: each entry
    followed by ``sep_ids``, then the prompt. Otherwise the entries' texts, joined by newlines, go where the
    placement says (``sep`` between them and the question) and the whole text is tokenised again, as if typed.

    Every placement writes the context before the end of the prompt's last user turn, so the tokens from there on
    (the assistant's header, and an answer when the prompt holds one) end the new sequence unchanged: logits taken
    from the right end align with the prompt's own positions wherever a loss or an answer is scored."""
    entries = [c for c in context_ids if c]
    if not entries:
        return list(prompt_ids)
    if placement != "prefix":
        if tok is None:
            raise MemcliError(f"placement '{placement}' needs the run's tokenizer")
        text = place_text(tok, decode(tok, prompt_ids), "\n".join(decode(tok, c) for c in entries), placement, sep)
        if text is not None:
            return encode(tok, text)
    return [t for c in entries for t in (*c, *sep_ids)] + list(prompt_ids)
