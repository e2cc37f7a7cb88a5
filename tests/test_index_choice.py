"""Index choice: which FAISS index fits a corpus and a memory budget, and its factory keys."""

import faiss
import pytest

from pipeline.errors import IndexKeyError
from pipeline.index import choice

BIG = 1 << 40


@pytest.mark.parametrize(("n", "dim", "memory", "key"), [
    (1_000, 384, None, "Flat"),
    (87_381, 384, None, "Flat"),               # 2**25 floats: the last exact size
    (87_382, 384, BIG, "HNSW32"),
    (1_000_000, 384, BIG, "HNSW32"),
    (1_000_001, 384, BIG, "IVF4096,Flat"),     # beyond HNSW's build-time cap
    # 1M x 384 takes 1.81 GB as HNSW32, 1.54 as IVF-Flat, 0.87 as PQ + float16 refinement,
    # 0.39 as SQ8 and 0.10 as PQ96
    (1_000_000, 384, 1_600_000_000, "IVF4096,Flat"),
    (1_000_000, 384, 1_000_000_000, "IVF4096,PQ96x8,Refine(SQfp16)"),
    (1_000_000, 384, 500_000_000, "IVF4096,SQ8"),
    (1_000_000, 384, 200_000_000, "IVF4096,PQ96x8"),
    (1_000_000, 384, 50_000_000, "IVF4096,PQ96x8"),     # nothing fits: the smallest
    (10_000_000, 768, BIG, "IVF16384,Flat"),
    (100_000_000, 128, BIG, "IVF32768,Flat"),
])
def test_choose_index_key(n, dim, memory, key):
    assert choice.choose_index_key(n, dim, memory) == key
    made = choice.make_index(dim, key)  # every choice is a valid inner-product factory string
    assert made.metric_type == faiss.METRIC_INNER_PRODUCT


@pytest.mark.parametrize(("n", "nlist"), [
    (100_000, 1024), (1_000_000, 4096), (4_000_000, 8192), (2_000, 32), (50, 1), (1, 1)])
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
