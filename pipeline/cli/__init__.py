"""The `pipeline` command line: one Typer app (app.py), a module per group of commands."""

from pipeline.cli.app import app
from pipeline.cli.train import register

register(app)

__all__ = ["app"]
