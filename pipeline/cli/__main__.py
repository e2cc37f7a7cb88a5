"""`python -m pipeline.cli`: the same app as the `pipeline` command."""

from pipeline.cli import app

app()
