"""Index choice: which FAISS index fits a corpus and a memory budget, and its factory keys."""

import faiss
import numpy as np
import pytest
from helpers_index import clustered_unit_vectors

from pipeline.errors import IndexKeyError, UsageError
from pipeline.index import choice

BIG = 1 << 40


@pytest.mark.parametrize(("n", "dim", "memory", "key"), [
    (1_000, 384, None, "Flat"),
    (87_381, 384, None, "Flat"),               # 2**25 floats: the last exact size
    (87_382, 384, BIG, "HNSW32"),
    (1_000_000, 384, BIG, "HNSW32"),
    (1_000_001, 384, BIG, "IVF16384_HNSW32,Flat"),  # beyond HNSW's build-time cap
    # The index may take half the budget. 999,999 x 384 takes 1.81 GB as HNSW32, 1.55 as
    # IVF-Flat, 0.88 as PQ + float16 refinement, 0.40 as SQ8, 0.11 as PQ96 (+ fp16 on disk)
    (999_999, 384, 3_200_000_000, "IVF4096,Flat"),
    (999_999, 384, 2_000_000_000, "IVF4096,PQ96x8,Refine(SQfp16)"),
    (999_999, 384, 1_000_000_000, "IVF4096,SQ8"),
    (999_999, 384, 400_000_000, "IVF4096,PQ96x8,Rescore(fp16)"),
    (999_999, 384, 150_000_000, "IVF4096,PQ48x8,Rescore(fp16)"),
    (999_999, 384, 1_000_000, "IVF4096,PQ8x8,Rescore(fp16)"),  # nothing fits: smallest
    (10_000_000, 384, 2_000_000_000, "IVF65536_HNSW32,PQ64x8,Rescore(fp16)"),
    (10_000_000, 768, BIG, "IVF65536_HNSW32,Flat"),
    (100_000_000, 128, BIG, "IVF131072_HNSW32,Flat"),
])
def test_choose_index_key(n, dim, memory, key):
    assert choice.choose_index_key(n, dim, memory) == key
    made = choice.make_index(dim, key)  # every choice is a valid inner-product index key
    assert made.metric_type == faiss.METRIC_INNER_PRODUCT


@pytest.mark.parametrize("key", ["IVF32,Flat", "IVF32,PQ8x8,Refine(SQfp16)", "IVF32,SQ8",
                                 "HNSW32", "OPQ8,IVF32,PQ8x8", "BFlat,Rescore(int8)"])
def test_index_bytes_estimate_matches_faiss_serialised_size(key):
    """The estimate the key choice trusts, against FAISS's own bytes for a built index."""
    x = clustered_unit_vectors(20_000, 32, clusters=30)
    index = choice.make_index(32, key)
    if isinstance(index, faiss.IndexBinary):
        codes = np.packbits(x > 0, axis=1)
        index.add(codes)
        size = len(faiss.serialize_index_binary(index))
    else:
        ivf = faiss.try_extract_index_ivf(index)
        if ivf is not None and isinstance(faiss.downcast_index(ivf), faiss.IndexIVFPQ):
            faiss.downcast_index(ivf).do_polysemous_training = False
        index.train(x[:3000])
        index.add(x)
        size = len(faiss.serialize_index(index))
    assert choice.index_bytes(20_000, 32, key) == pytest.approx(size, rel=0.15)


@pytest.mark.parametrize(("text", "n"), [("4GB", 4 * 10**9), ("512MB", 512 * 10**6),
                                         ("2GiB", 2 * 2**30), ("1.5g", 1_500_000_000),
                                         ("1000", 1000), (" 3 kB ", 3000)])
def test_parse_bytes(text, n):
    assert choice.parse_bytes(text) == n


@pytest.mark.parametrize("text", ["", "lots", "-1GB", "0", "4 GBs", "1e9"])
def test_bad_memory_budget_is_a_one_line_error(text):
    with pytest.raises(UsageError, match="is not a size"):
        choice.parse_bytes(text)


@pytest.mark.parametrize(("key", "message"), [
    ("BFlat", "add ',Rescore(int8)'"),
    ("Flat,Rescore(int4)", "is not one of"),
    ("Rescore(int8),Flat", "write Rescore"),
    (",Rescore(int8)", "nothing before Rescore"),
])
def test_bad_rescore_or_binary_keys_are_one_line_errors(key, message):
    with pytest.raises(IndexKeyError, match=message.replace("(", r"\(").replace(")", r"\)")):
        choice.make_index(64, key)


def test_binary_keys_need_dims_divisible_by_8():
    with pytest.raises(IndexKeyError, match="divisible by 8"):
        choice.make_index(60, "BFlat,Rescore(int8)")


@pytest.mark.parametrize(("n", "nlist"), [
    (100_000, 1024), (999_999, 4096), (1_000_000, 16384), (4_000_000, 65536),
    (10_000_000, 65536), (10_000_001, 131072), (400_000_000, 262144),
    (2_000, 32), (50, 1), (1, 1)])
def test_ivf_lists_near_four_sqrt_n_power_of_two(n, nlist):
    assert choice.ivf_lists(n) == nlist


@pytest.mark.parametrize(("dim", "m"), [(384, 96), (768, 192), (64, 16), (100, 25), (7, 1)])
def test_pq_subquantizers_divide_dim(dim, m):
    assert choice.pq_subquantizers(dim) == m


@pytest.mark.parametrize("key", ["Bogus", "IVF,Flat", "", "  ", "IDMap,Flat", "IVF16,PQ7"])
def test_bad_key_is_a_one_line_error(key):
    with pytest.raises(IndexKeyError) as err:
        choice.make_index(32, key)
    message = str(err.value)
    assert "\n" not in message and "index_factory" not in message
