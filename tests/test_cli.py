"""The CLI's help texts: they name only commands that exist."""

import re

from typer.testing import CliRunner

from alignforge.cli import app

NOT_YET: tuple[str, ...] = ()  # commands the help may not mention yet (none left)


def _help_texts():
    """``--help`` of the app, of every group and of every command in it."""
    import typer.main

    root = typer.main.get_command(app)
    runner = CliRunner()
    stack = [((), root)]
    while stack:
        path, cmd = stack.pop()
        res = runner.invoke(app, [*path, "--help"])
        assert res.exit_code == 0, (path, res.output)
        yield " ".join(path) or "alignforge", res.output
        for name, sub in sorted(getattr(cmd, "commands", {}).items()):
            stack.append(((*path, name), sub))


def test_help_advertises_no_missing_command():
    texts = dict(_help_texts())
    assert {
        "sft",
        "dpo",
        "ulma",
        "ppo",
        "rm train",
        "annotate serve",
        "rain generate",
        "serve",
        "eval generate",
        "eval judge",
        "eval winrate",
        "pipeline",
    } <= set(texts)  # the walk reaches subcommands
    pat = re.compile(r"\b(" + "|".join(NOT_YET) + r")\b", re.IGNORECASE) if NOT_YET else None
    bad = {where: m.group(0) for where, text in texts.items() if pat and (m := pat.search(text))}
    assert not bad, f"help mentions commands that do not exist: {bad}"
