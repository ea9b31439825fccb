"""``memcli chat``: one-shot or interactive chat with a trained checkpoint (works with piped stdin)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from memcli.views import console, emit, table


def chat(
    model_path: Optional[Path] = typer.Option(None, "--model-path", "-m", help="Checkpoint or run directory (default: newest run under out/)."),
    model_type: str = typer.Option("memory", "--model-type", "-t", help="memory (an explicit-memory run), hippo (dialog "
                                   "memory), hrpo (latent reasoning), or lora / full: a run of any kind whose backbone "
                                   "was trained that way."),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="Answer this one message and exit."),
    out_dir: Path = typer.Option(Path("out"), help="Where to look for the newest run."),
    max_new_tokens: int = typer.Option(64, help="Tokens to generate per answer."),
    temperature: float = typer.Option(0.0, help="0 = greedy; > 0 samples."),
    top_p: float = typer.Option(1.0, help="Nucleus sampling mass (with temperature > 0)."),
    repetition_penalty: float = typer.Option(1.0, help="> 1 discourages repeats (positive logits divided, negative multiplied)."),
    as_json: bool = typer.Option(False, "--json", help="With --prompt: print answer and memory read as JSON."),
    recall: int = typer.Option(0, "--recall", help="HIPPO: also keep the turns as memory entries and read the message's "
                               "top N turns before it (0: the state alone)."),
    session_file: Optional[Path] = typer.Option(None, "--session", help="HIPPO: save the memory (state and turns) to this "
                                           "file after every answer, and reopen it when it exists."),
    encoder: str = typer.Option("minilm", "--encoder", help="HIPPO with --recall / --session: the turn memory's dense "
                                "keys: minilm, mpnet or a directory written by 'memcli train retriever'."),
):
    """Talk to a trained model; answers stream token by token (KV cache).

    Commands in the loop: /exit (or exit, quit), /reset, /memory (entries read for the last answer), /help.
    With --model-type hrpo answers decode as the run was trained (hybrid: latent mixing until '####'; or plain).
    With --model-type hippo the prompt never carries the history: each turn is written into the
    memory state; /reset_hidden (or reset_hidden) clears it, /state shows its norm and turn count.
    --recall N also keeps every turn as a retrievable entry (BM25 + MiniLM) and reads the message's
    top N turns before it (/memory lists them); --session FILE keeps the memory across runs.
    End of input (Ctrl-D, or the end of a pipe) exits with code 0.

    [bold]Examples[/bold]

      memcli chat --prompt "What does Velmora work as?"
      memcli chat --model-type lora --model-path out/memory
      printf 'Where was Velmora born?\\n/memory\\n' | memcli chat
      printf 'My pet is Zorvak.\\nWhat is my pet called?\\n' \\
          | memcli chat -t hippo -m out/hippo
      memcli chat -t hippo -m out/hippo --recall 5 --session me.session
      memcli chat -t hippo -m out/hippo --recall 5 --encoder out/turn-encoder
    """
    from transformers import TextStreamer

    from memcli.chat import GenOptions, open_session

    opts = GenOptions(max_new_tokens, temperature, top_p, repetition_penalty)
    session, path = open_session(model_path, model_type, opts, out_dir, recall=recall, session=session_file,
                                 encoder=encoder)
    if prompt is None:
        _loop(session, path)
    elif as_json:
        answer = session.reply(prompt)
        emit(dict({"checkpoint": str(path), "prompt": prompt, "answer": answer}, **session.json_extra()), True)
    else:
        session.reply(prompt, streamer=TextStreamer(session.tok, skip_prompt=True, skip_special_tokens=True))


def _loop(session, path: Path) -> None:
    """Read messages until /exit or the end of input; slash commands go to the session (its own set)."""
    from transformers import TextStreamer

    interactive = sys.stdin.isatty()
    if interactive:
        console.print(f"memcli chat · {path} · {session.help}")
    streamer = TextStreamer(session.tok, skip_prompt=True, skip_special_tokens=True)
    while True:
        if interactive:
            console.print("[bold cyan]you>[/bold cyan] ", end="")
        line = sys.stdin.readline()
        if not line:  # end of input
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "exit", "quit", "/quit"):  # the seeds' loops end on the bare words too
            break
        out = session.help if text == "/help" else session.command(text)
        if isinstance(out, tuple):
            console.print(table(*out))
        elif out is not None:
            console.print(out)
        elif text.startswith("/"):
            console.print(f"unknown command {text}; {session.help}")
        else:
            if interactive:
                console.print("[bold green]model>[/bold green] ", end="")
            session.reply(text, streamer=streamer)
            sys.stdout.flush()


def register(app: typer.Typer) -> None:
    app.command("chat")(chat)
