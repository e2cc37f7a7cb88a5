"""The `pipeline` command line: one Typer app (app.py: options, error handling), a module per
group of commands, each registering its commands on the app when imported."""

from pipeline.cli import cluster, search, similarity, stages, tokenizer  # noqa: F401 (they register)
from pipeline.cli.app import app
from pipeline.cli.train import register

register(app)

__all__ = ["app"]
