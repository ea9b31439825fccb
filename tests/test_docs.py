"""The front page and the documentation site: the README's commands parse as written, the scripts it names exist,
it stays a front page, and the site builds strictly and offline (no font or script fetched when a page is viewed)."""

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


def _bash_lines(markdown: str) -> list[str]:
    """Command lines of the ```bash blocks (a line ending in a backslash continued by the next)."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", markdown, flags=re.S):
        cont = False
        for ln in block.split("\n"):
            text = ln.strip()
            if cont:
                out[-1] += " " + text.removesuffix("\\").strip()
            elif text and not text.startswith("#"):
                out.append(text.removesuffix("\\").strip())
            cont = text.endswith("\\")
    return out


def test_readme_is_a_front_page_and_every_command_in_it_parses():
    from test_help import _commands

    from typer import _click as click

    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 260
    root, _ = _commands()
    lines = _bash_lines(readme)
    memcli = [ln for ln in lines if ln.startswith("memcli ")]
    assert len(memcli) >= 10
    for ln in memcli:
        words = shlex.split(ln, comments=True)
        for stop in ("|", ">", "&&", ";"):
            if stop in words:
                words = words[: words.index(stop)]
        cur, args, name = root, words[1:], ["memcli"]
        while hasattr(cur, "get_command") and args and cur.get_command(click.Context(cur), args[0]) is not None:
            name.append(args[0])
            cur, args = cur.get_command(click.Context(cur), args[0]), args[1:]
        assert not hasattr(cur, "get_command"), f"{ln!r}: not a command"
        try:
            cur.make_context(" ".join(name), list(args))
        except click.exceptions.UsageError as e:
            pytest.fail(f"{ln!r}: {e.format_message()}")
    for ln in lines:  # scripts named are where they are said to be
        for path in re.findall(r"(?:python|bash) ((?:tools|experiments|\.ci)/[\w./-]+)", ln):
            assert (ROOT / path).is_file(), ln
    # from the front page to "my own facts answered in chat": the guide is one link away
    assert "docs/guides/your-own-facts.md" in readme
    # every relative link of the front page opens (GitHub renders them; the site is built from docs/ alone)
    links = [t.split("#")[0] for t in re.findall(r"\]\(([^)\s]+)\)", readme) if not re.match(r"[a-z]+:", t)]
    assert links and not [t for t in links if t and not (ROOT / t).exists()]


@pytest.mark.skipif(shutil.which("mkdocs") is None and not (Path(sys.executable).parent / "mkdocs").exists(),
                    reason="mkdocs is not installed (the dev extra installs it)")
def test_the_site_builds_strictly_and_works_offline(tmp_path):
    mkdocs = Path(sys.executable).parent / "mkdocs"
    r = subprocess.run([str(mkdocs) if mkdocs.exists() else "mkdocs", "build", "--strict", "-d", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)  # not -q: it hides the warnings --strict counts
    assert r.returncode == 0, r.stderr[-3000:]
    pages = list(tmp_path.rglob("*.html"))
    assert len(pages) >= 20
    for page in pages:
        html = page.read_text(encoding="utf-8")
        # nothing fetched at view time: no remote stylesheet, script or font
        remote = re.findall(r"<(?:link|script)[^>]+(?:href|src)=\"(https?:)?//[^\"]+\"", html)
        assert not remote, (page.name, remote[:3])
        assert "fonts.googleapis" not in html and "fonts.gstatic" not in html
    commands = (tmp_path / "reference" / "commands.html").read_text(encoding="utf-8")
    assert "memcli compare editing" in commands and "--edits-file" in commands
    assert "model.anchor_df" in (tmp_path / "reference" / "configuration.html").read_text(encoding="utf-8")
