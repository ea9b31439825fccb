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
):
    """Talk to a trained model; answers stream token by token (KV cache).

    Commands in the loop: /exit (or exit, quit), /reset, /memory (entries read for the last answer), /help.
    With --model-type hrpo answers decode as the run was trained (hybrid: latent mixing until '####'; or plain).
    With --model-type hippo the prompt never carries the history: each turn is written into the
    memory state; /reset_hidden (or reset_hidden) clears it, /state shows its norm and turn count.
    End of input (Ctrl-D, or the end of a pipe) exits with code 0.

    [bold]Examples[/bold]

      memcli chat --prompt "What does Velmora work as?"
      memcli chat --model-type lora --model-path out/memory
      printf 'Where was Velmora born?\\n/memory\\n' | memcli chat
      printf 'My pet is called Zorvak.\\nWhat is my pet called?\\n/state\\n' | memcli chat -t hippo -m out/hippo
    """
    from transformers import TextStreamer

    from memcli.chat import HELP, HIPPO_HELP, GenOptions, HippoChatSession, HrpoChatSession, open_session

    opts = GenOptions(max_new_tokens, temperature, top_p, repetition_penalty)
    session, path = open_session(model_path, model_type, opts, out_dir)
    hippo = isinstance(session, HippoChatSession)
    hrpo = isinstance(session, HrpoChatSession)
    help_text = HIPPO_HELP if hippo else HELP.replace(" · /memory entries read for the last answer", "") if hrpo else HELP
    if prompt is not None:
        if as_json:
            answer = session.reply(prompt)
            extra = ({"state": session.state_info()} if hippo else {"hybrid": session.last_stats} if hrpo
                     else {"memory": session.last_memory})
            emit(dict({"checkpoint": str(path), "prompt": prompt, "answer": answer}, **extra), True)
        else:
            session.reply(prompt, streamer=TextStreamer(session.tok, skip_prompt=True, skip_special_tokens=True))
        return
    interactive = sys.stdin.isatty()
    if interactive:
        console.print(f"memcli chat · {path} · {help_text}")
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
        if text == "/help":
            console.print(help_text)
        elif hippo and text in ("/reset_hidden", "reset_hidden", "/reset"):
            session.reset_hidden()
            console.print("memory state cleared")
        elif hippo and text == "/state":
            info = session.state_info()
            console.print(f"state: {info['turns']} turns, norm {info['state_norm']:.4f}, shape {info['state_shape']}")
        elif hippo and text == "/memory":
            console.print("a HIPPO model has no entries to show; /state shows the memory state")
        elif hrpo and text == "/memory":
            console.print("an HRPO model has no memory entries; its latent steps are in the answer's decoding")
        elif text == "/reset":
            session.reset()
            console.print("history cleared")
        elif text == "/memory":
            mem = session.last_memory
            if not mem:
                console.print("no answer yet")
            else:
                console.print(table("memory read for the last answer", ["row", "share", "entry"],
                                    [(m["row"], m["share"], m["text"]) for m in mem]))
        elif text.startswith("/"):
            console.print(f"unknown command {text}; {help_text}")
        else:
            if interactive:
                console.print("[bold green]model>[/bold green] ", end="")
            session.reply(text, streamer=streamer)
            sys.stdout.flush()


def register(app: typer.Typer) -> None:
    app.command("chat")(chat)
