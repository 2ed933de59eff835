"""The parameter reference (``docs/parameters.md``), generated from the configuration and
the command line's parser, so that it cannot drift from them (a test compares):

    .venv/bin/python -m img2prompt.reports.reference > docs/parameters.md
"""

import argparse
from dataclasses import fields

from img2prompt.config import StudyConfig, allowed_values


def parameter_reference() -> str:
    """The settings (``StudyConfig``: their notebook parameter, command-line option, default
    and allowed values) and each command with its options, as Markdown."""
    from img2prompt.cli import build_parser
    from img2prompt.reports.notebooks import declared_parameters, find_notebooks

    notebooks = {path.stem[:2]: declared_parameters(path) for path in find_notebooks("notebooks")}
    commands = list(_commands(build_parser()))
    options = {}  # setting -> the options that set it, over every command
    for _, command in commands:
        for action in command._actions:
            for option in action.option_strings:
                options.setdefault(action.dest, set()).add(option)
    lines = ["# Parameter reference", "",
             "Generated from `StudyConfig` (`img2prompt/config.py`) and the command line's parser by",
             "`.venv/bin/python -m img2prompt.reports.reference > docs/parameters.md`; a test fails when",
             "this page is stale. Every setting is checked once, before anything is written: a value out",
             "of range is one message with the setting, its value and what is allowed.", "",
             "## Settings", "",
             "Each is an option of the commands that use it (a setting with none is set through the",
             "notebooks or the library) and a parameter of the notebooks that declare it",
             "(`./run_all.sh -p NAME VALUE`); a run saves them all in its `config.json`.", "",
             "| setting | option | notebooks | default | allowed | what |", "|---|---|---|---|---|---|"]
    for spec in fields(StudyConfig):
        declared = ", ".join(number for number, names in notebooks.items() if spec.name in names) or "–"
        if spec.metadata.get("choices"):
            allowed = " \\| ".join(spec.metadata["choices"])
        elif isinstance(spec.default, (int, float)) and not isinstance(spec.default, bool):
            allowed = allowed_values(spec)
        else:
            allowed = "text"
        option = ", ".join(f"`{o}`" for o in sorted(options.get(spec.name, ()))) or "–"
        lines.append(f"| `{spec.name}` | {option} | {declared} | `{spec.default!r}` | {allowed} | "
                     f"{_cell(spec.metadata['help'])} |")
    study = {name for names in notebooks.values() for name in names} - {spec.name for spec in fields(StudyConfig)}
    lines += ["", "Notebook parameters beyond the settings: " + ", ".join(
        f"`{name}` ({', '.join(n for n, names in notebooks.items() if name in names)})" for name in sorted(study))
        + ".", "", "## Commands", ""]
    for command, parser in commands:
        lines += [f"### `img2prompt {command}`", "", _cell(parser.description or ""), "",
                  "| argument | what |", "|---|---|"]
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
                continue
            name = ", ".join(f"`{o}`" for o in action.option_strings) or f"`{action.metavar or action.dest}`"
            lines.append(f"| {name} | {_cell((action.help or '').replace('%%', '%'))} |")
        lines.append("")
    return "\n".join(lines)


def _commands(parser, prefix=""):
    """(command name, its parser) of every command, sub-commands included, in order."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                if any(isinstance(a, argparse._SubParsersAction) for a in sub._actions):
                    yield from _commands(sub, f"{prefix}{name} ")
                else:
                    yield f"{prefix}{name}", sub


def _cell(text) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


if __name__ == "__main__":
    print(parameter_reference())
