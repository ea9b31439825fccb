"""The ``memcli`` command: a Typer app whose commands are thin layers over the core API."""

from __future__ import annotations

import errno
import sys

import typer

try:  # typer >= 0.22 vendors its own click; its exceptions are not the click package's
    from typer._click.exceptions import ClickException, NoArgsIsHelpError, UsageError
except ImportError:  # pragma: no cover
    from click.exceptions import ClickException, NoArgsIsHelpError, UsageError  # type: ignore

from memcli import __version__
from memcli.errors import MemcliError

app = typer.Typer(
    name="memcli",
    help="Memory-augmented language models: explicit token memory, HIPPO dialog memory, HRPO latent reasoning.",
    rich_markup_mode="rich",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool):
    if value:
        typer.echo(f"memcli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
):
    """[bold]memcli[/bold] — one toolkit for memory-augmented LLMs. Run [cyan]memcli COMMAND --help[/cyan] for examples."""


def reflow(doc: str | None) -> str | None:
    """A command's docstring as help that re-flows: the lines of a prose paragraph joined (Rich wraps them to the
    terminal's width, or 80 columns when piped, between words), indented lines (examples) kept one per line."""
    if not doc:
        return doc
    import inspect

    out = []
    for para in inspect.cleandoc(doc).split("\n\n"):
        lines = [ln for ln in para.split("\n") if ln.strip()]
        if lines and all(ln.startswith(" ") for ln in lines):
            out.append("\n".join(lines))
        else:
            out.append(" ".join(ln.strip() for ln in lines))
    return "\n\n".join(out)


def _reflow_all(t: typer.Typer) -> None:
    for c in t.registered_commands:
        if c.callback is not None:
            c.callback.__doc__ = reflow(c.callback.__doc__)
    for g in t.registered_groups:
        g.typer_instance.info.help = reflow(g.typer_instance.info.help)
        _reflow_all(g.typer_instance)


def _register() -> None:
    from memcli.cli import chat, compare, data, inspect, memory, train

    data.register(app)
    train.register(app)
    chat.register(app)
    inspect.register(app)
    memory.register(app)
    compare.register(app)
    _reflow_all(app)


_register()


def _one_line(msg: str) -> str:
    return " ".join(str(msg).split())


def main(argv: list[str] | None = None) -> None:
    """Entry point: bad input -> one line on stderr and exit code 2, never a traceback."""
    try:
        app(args=argv, prog_name="memcli", standalone_mode=False)
    except MemcliError as e:
        print(f"memcli: error: {_one_line(str(e))}", file=sys.stderr)
        sys.exit(e.exit_code)
    except NoArgsIsHelpError:
        sys.exit(0)  # help was printed
    except UsageError as e:
        cmd = e.ctx.command_path if e.ctx is not None else "memcli"
        print(f"{cmd}: error: {_one_line(e.format_message())} (see '{cmd} --help')", file=sys.stderr)
        sys.exit(2)
    except ClickException as e:
        print(f"memcli: error: {_one_line(e.format_message())}", file=sys.stderr)
        sys.exit(2)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        print("memcli: interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # output piped into head & co.
        sys.stderr.close()
        sys.exit(0)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EACCES, errno.EROFS, errno.EISDIR, errno.ENOTDIR, errno.ENOENT, errno.EDQUOT):
            where = f"{e.filename}: " if e.filename else ""
            print(f"memcli: error: {where}{e.strerror or e}", file=sys.stderr)
            sys.exit(2)
        raise
    sys.exit(0)
