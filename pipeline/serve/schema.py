"""The API's request bodies, the checks on what they hold, and the shapes of its answers: pure
functions, so that what the web page and clients depend on is read (and tested) in one place.

Every refusal is an ApiError: an HTTP status and one line, answered as {"error": "..."}.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict

from pipeline.analysis.metrics import check_metric, similarity, similarity_matrix
from pipeline.search import Hit

MAX_INPUTS = 256  # texts in one request: more is a 413 (send several requests)
MAX_K = 1000
RETRY_AFTER = {"Retry-After": "1"}


class ApiError(Exception):
    """A request the server refuses, with the status to answer."""

    def __init__(self, message: str, status: int = 422, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.headers = headers


def busy(message: str) -> ApiError:
    """503 with Retry-After: the request is fine, the server cannot answer it just now."""
    return ApiError(message, 503, RETRY_AFTER)


def one_line(message: str) -> str:
    lines = str(message).strip().splitlines()
    return lines[0] if lines else "error"


class Strict(BaseModel):
    # strict: "k": "10" or true is a wrong type, not a 10 or a 1; forbid: a misspelt field
    # ("querys") is refused rather than ignored.
    model_config = ConfigDict(strict=True, extra="forbid")


class SearchBody(Strict):
    queries: list[str] | None = None
    query: str | None = None
    k: int = 10
    index: str | None = None


class EmbedBody(Strict):
    input: Any  # a string or a list of strings: checked by as_texts, for a one-line message
    index: str | None = None


class OpenAIEmbedBody(BaseModel):
    # OpenAI's clients send fields of their own (user, dimensions, ...): ignored.
    model_config = ConfigDict(strict=True, extra="ignore")
    input: Any
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"


class SimilarityBody(Strict):
    texts: list[str] | None = None
    pairs: list[list[str]] | None = None
    metric: str = "cosine"
    index: str | None = None


def validation_message(errors: Sequence[dict]) -> str:
    """pydantic's list of problems (FastAPI's RequestValidationError) as one line."""
    if not errors:
        return "invalid request"
    first = errors[0]
    if first.get("type") == "json_invalid":
        return f"malformed JSON: {first.get('ctx', {}).get('error', first.get('msg'))}"
    loc = [str(part) for part in first.get("loc", ())]
    where = ".".join(loc[1:]) or (loc[0] if loc else "request")  # without "body"/"query"
    if loc == ["body"]:  # no body, a body not sent as JSON, or JSON that is no object
        return "the body must be a JSON object, sent with Content-Type: application/json"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where}: {first.get('msg')}{more}"


def check_k(k: int) -> int:
    if not 1 <= k <= MAX_K:
        raise ApiError(f"k must be between 1 and {MAX_K}, not {k}")
    return k


def as_texts(value: Any, what: str) -> list[str]:
    """A string or a list of strings, as a list."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    raise ApiError(f"{what} must be a string or a list of strings")


def check_texts(texts: Sequence[str], what: str) -> tuple[str, ...]:
    """Texts a request may have embedded: at least one, at most MAX_INPUTS, none blank."""
    if not texts:
        raise ApiError(f"{what} is empty: give at least one text")
    if len(texts) > MAX_INPUTS:
        raise ApiError(f"{len(texts)} texts in one request: at most {MAX_INPUTS}, send the "
                       "rest in another", 413)
    for i, text in enumerate(texts):
        if not text.strip():
            raise ApiError(f"{what} is empty" if len(texts) == 1 else f"{what}[{i}] is empty")
    return tuple(texts)


def search_texts(body: SearchBody) -> tuple[str, ...]:
    if (body.query is None) == (body.queries is None):
        raise ApiError("give either query (one text) or queries (a list)")
    if body.query is not None:
        return check_texts([body.query], "query")
    return check_texts(body.queries, "queries")


def similarity_texts(body: SimilarityBody) -> tuple[str, ...]:
    """The texts to embed: texts as given, or each pair's two in turn."""
    check_metric(body.metric)  # a UsageError: answered 422, as an ApiError would be
    if (body.texts is None) == (body.pairs is None):
        raise ApiError("give either texts (all pairs of them) or pairs ([[a, b], ...])")
    if body.texts is not None:
        return check_texts(body.texts, "texts")
    if not all(len(pair) == 2 for pair in body.pairs):
        raise ApiError("each of pairs must be two texts: [a, b]")
    return check_texts([t for pair in body.pairs for t in pair], "pairs")


def similarity_answer(vectors: np.ndarray, metric: str, pairs: bool) -> dict:
    """{"metric", "scores"} of consecutive pairs of vectors, or {"metric", "matrix"}."""
    if pairs:
        return {"metric": metric, "scores": [similarity(vectors[i], vectors[i + 1], metric)
                                             for i in range(0, len(vectors), 2)]}
    return {"metric": metric, "matrix": similarity_matrix(vectors, metric).tolist()}


def hits_json(hits: Sequence[Hit]) -> list[dict]:
    return [dict(vars(hit)) for hit in hits]


def openai_embedding(vector: np.ndarray, encoding_format: str) -> list[float] | str:
    """A vector as OpenAI's API writes it: floats, or base64 of little-endian float32 (what
    OpenAI's own client asks for by default)."""
    if encoding_format == "base64":
        return base64.b64encode(np.asarray(vector, "<f4").tobytes()).decode("ascii")
    return vector.tolist()
