"""Help that reads well anywhere: every command's help re-flows (no prose line break left for Rich to wrap again),
has an example, and every example is a command line the parser accepts as written."""

import shlex

import pytest
import typer

from memcli.cli import app, reflow

EXAMPLE_WIDTH = 78  # an example line longer than this would wrap in an 80-column terminal (Rich adds a margin)


def _commands():
    from typer import _click as click  # typer >= 0.22 vendors click

    root = typer.main.get_command(app)

    def walk(cmd, path):
        if hasattr(cmd, "list_commands"):
            for name in cmd.list_commands(click.Context(cmd)):
                yield from walk(cmd.get_command(click.Context(cmd), name), [*path, name])
        else:
            yield path, cmd

    return root, list(walk(root, []))


def _examples(help_text: str) -> list[str]:
    """The example command lines of a help text, a line ending in a backslash continued by the next."""
    out, on, cont = [], False, False
    for ln in (help_text or "").split("\n"):
        text = ln.strip()
        if "Example" in ln:
            on = True
        elif on and cont:
            out[-1] += " " + text.removesuffix("\\").strip()
        elif on and text.startswith("memcli "):
            out.append(text.removesuffix("\\").strip())
        else:
            continue
        cont = text.endswith("\\")
    return out


def test_reflow_joins_prose_and_keeps_examples():
    doc = """First line.

    A paragraph written over
    two lines.

    [bold]Examples[/bold]

      memcli chat --prompt hi
      memcli chat -t hippo
    """
    assert reflow(doc) == ("First line.\n\nA paragraph written over two lines.\n\n[bold]Examples[/bold]\n\n"
                           "  memcli chat --prompt hi\n  memcli chat -t hippo")


def test_every_command_has_reflowed_help_and_an_example():
    _, cmds = _commands()
    assert len(cmds) >= 25
    for path, cmd in cmds:
        text = cmd.help or ""
        for para in text.split("\n\n"):
            lines = para.split("\n")
            if not all(ln.startswith(" ") for ln in lines):
                assert len(lines) == 1, (path, para[:80])  # a prose paragraph is one line: Rich re-flows it
        examples = _examples(text)
        assert examples, f"memcli {' '.join(path)} has no example"
        for ln in text.split("\n"):
            assert len(ln) <= EXAMPLE_WIDTH or not ln.startswith("  "), (path, ln)  # example lines do not wrap


def test_every_example_parses_as_written():
    """Each example runs through the command's own parser (options, their values and types), nothing executed."""
    from typer import _click as click

    root, cmds = _commands()
    seen = 0
    for path, cmd in cmds:
        for ex in _examples(cmd.help or ""):
            words = shlex.split(ex, comments=True)
            for stop in ("|", ">", "&&", ";"):
                if stop in words:
                    words = words[: words.index(stop)]
            assert words[0] == "memcli"
            cur, args, name = root, words[1:], ["memcli"]
            while hasattr(cur, "get_command") and args and cur.get_command(click.Context(cur), args[0]) is not None:
                name.append(args[0])
                cur, args = cur.get_command(click.Context(cur), args[0]), args[1:]
            assert cur is cmd or name[1:] != path, (ex, name)
            try:
                cur.make_context(" ".join(name), list(args))
            except click.exceptions.UsageError as e:
                pytest.fail(f"{ex!r}: {e.format_message()}")
            seen += 1
    assert seen >= len(cmds)


def test_piped_help_is_80_columns_and_unbroken(monkeypatch, capsys):
    from conftest import run_cli

    monkeypatch.setenv("COLUMNS", "80")
    code, out, _ = run_cli(["compare", "editing", "--help"], capsys)
    assert code == 0
    assert max(len(ln) for ln in out.splitlines()) <= 80
    flat = " ".join(out.split())
    assert "generalisation asks it with a held-out LPAQA paraphrase and as a natural question" in flat
