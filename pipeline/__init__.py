"""pipeline: batch semantic search with a GPT-2 encoder."""

__version__ = "0.1.0"
