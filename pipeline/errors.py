"""The errors a user can cause and fix: the CLI prints them as one line (exit code 1), the
server answers them with a 4xx and a JSON message. Any other exception is a bug and keeps its
traceback, so a `ValueError` deep in numpy is never mistaken for bad input."""


# The distribution's name, for `pip install` hints (the import package is `pipeline`).
DISTRIBUTION = "gpt2-semantic-pipeline"


def pip_install(extra: str) -> str:
    """The command that installs an optional extra (`extra`: report, umap, train, ...)."""
    return f"pip install '{DISTRIBUTION}[{extra}]'"


class PipelineError(Exception):
    """Base of every user-facing error; its message says what is wrong and how to fix it."""


class UsageError(PipelineError):
    """A bad option or argument."""


class InputFileError(PipelineError):
    """A file the user named is missing, unreadable or malformed."""


class CorpusError(InputFileError):
    """A corpus that cannot be read as documents."""


class TokenizerError(PipelineError):
    """GPT-2's BPE ranks file is missing or wrong."""


class ModelSpecError(PipelineError):
    """`--model` names nothing we can load."""


class IndexFolderError(PipelineError):
    """An index folder lacks a stage's output, or holds outputs that do not match."""


class IndexBusy(IndexFolderError):
    """Another command is writing the index folder (or reading it, for a writer)."""


class IndexKeyError(UsageError):
    """A FAISS factory string we cannot build or use."""


class MissingExtra(PipelineError):
    """An optional dependency is not installed; the message names the pip extra."""


class TrainError(PipelineError):
    """Training settings or data that cannot work."""


class ChildFailed(PipelineError):
    """A helper process (the tokenizer of `tokenize --embed`, a layout planner) died."""


class DiskFull(PipelineError):
    """A write found no room: the disk (or the user's quota on it) is full. The message names
    the file; a file half written is removed."""
