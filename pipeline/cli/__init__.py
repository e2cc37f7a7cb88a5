"""The `pipeline` command line: one Typer app (app.py: options, error handling), a module per
group of commands, each registering its commands on the app when imported."""

import inspect

import pipeline.cli.serve  # noqa: F401 (it registers `pipeline serve`)
from pipeline.cli import cluster, search, similarity, stages, tokenizer  # noqa: F401 (they register)
from pipeline.cli.app import BUILD, MODEL, QUERY, app
from pipeline.cli.train import register

register(app)
# `pipeline --help` shows its panels in the order of their first command: build, query, models.
app.registered_commands.sort(key=lambda c: [BUILD, QUERY, MODEL].index(c.rich_help_panel))


def reflowed(doc: str) -> str:
    """A docstring's paragraphs each as one line: Typer keeps a paragraph's line breaks,
    which on a terminal of another width cut its lines in odd places."""
    return "\n\n".join(" ".join(p.split()) for p in inspect.cleandoc(doc).split("\n\n"))


for _command in app.registered_commands:
    if _command.help is None and _command.callback.__doc__:
        _command.help = reflowed(_command.callback.__doc__)

__all__ = ["app"]
