"""The padded path's batches: a document's vector is the same bits whatever rows share its
batch (alone, in a subset, in the whole shard), in bf16 and fp32, on real corpus text; and the
plan keeps every batch within its budget and to one padded length."""

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.embed.batching import PAD_MULTIPLE, padded_length, plan_batches
from pipeline.embed.encoder import Encoder

CORPUS = Path(__file__).resolve().parents[1] / "data_sets" / "debian_packages.parquet"


def test_padded_lengths_round_up_to_the_multiple_within_the_limit():
    assert [padded_length(n, 8) for n in (0, 1, 8, 9, 16, 17)] == [8, 8, 8, 16, 16, 24]
    assert padded_length(1020, 8, limit=1024) == 1024
    assert padded_length(1023, 8, limit=1021) == 1021


@pytest.mark.parametrize("multiple", [1, PAD_MULTIPLE])
def test_plan_covers_every_row_once_within_the_budget(multiple):
    lengths = np.random.default_rng(0).integers(1, 300, 2_000).tolist()
    batches = plan_batches(lengths, 4_096, pad_multiple=multiple)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for batch in batches:
        widths = {padded_length(lengths[i], multiple) for i in batch}
        assert len(batch) == 1 or max(widths) * len(batch) <= 4_096
        if multiple > 1:
            assert len(widths) == 1  # one padded length per batch


@pytest.fixture(scope="module")
def corpus_tokens():
    texts = pq.read_table(CORPUS, columns=["text"]).slice(0, 400)["text"].to_pylist()
    return Encoder.load(None, "cpu", precision="fp32").tokenizer.encode_batch(texts)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_vector_does_not_depend_on_the_lengths_beside_it(precision):
    """Batch-max padding gave a row the padded length of its longest neighbour, and the
    attention's blocks over it (on this CPU a padded length past 64 moved a bf16 vector by
    9e-4); padded to its own length's multiple of 8, a row gets the same bits beside any."""
    encoder = Encoder.load(None, "cpu", precision=precision)
    rng = np.random.default_rng(1)
    doc, *others = (rng.integers(0, 50_000, n).tolist() for n in (50, 60, 70, 130))
    alone = encoder.embed_token_lists([doc])[0]
    for other in others:
        np.testing.assert_array_equal(encoder.embed_token_lists([doc, other])[0], alone)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_vector_does_not_depend_on_its_batch(corpus_tokens, precision):
    """Real documents, embedded all together, a third of them, and one at a time. Rows of one
    padded length give the same bits in a batch of any size where the matrix library's kernel
    does not depend on the row count: bf16 here; fp32's sgemm blocks by it (2e-7 here)."""
    encoder = Encoder.load(None, "cpu", precision=precision)
    whole = encoder.embed_token_lists(corpus_tokens)
    every_third = encoder.embed_token_lists(corpus_tokens[::3], max_batch_tokens=2_000)
    alone = np.stack([encoder.embed_token_lists([corpus_tokens[i]])[0]
                      for i in range(0, len(corpus_tokens), 37)])
    tolerance = 1e-5  # far below batch-max padding's 3e-3 in bf16, above sgemm's blocking
    np.testing.assert_allclose(every_third, whole[::3], rtol=0, atol=tolerance)
    np.testing.assert_allclose(alone, whole[::37], rtol=0, atol=tolerance)
