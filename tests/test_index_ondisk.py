"""IVF lists built on disk (pipeline.index.ondisk) against FAISS's own add_with_ids, and the
rescore file's plain reads against numpy slicing of the same bytes."""

import faiss
import numpy as np
import pytest
from helpers_index import clustered_unit_vectors

from pipeline.index import ondisk, rescore

DIM = 32


def trained(key, x):
    index = faiss.index_factory(DIM, key, faiss.METRIC_INNER_PRODUCT)
    index.train(x)
    return index


def in_memory_lists(index):
    """{list: (ids, codes)} of an index's inverted lists, whatever their storage."""
    lists = faiss.extract_index_ivf(index).invlists
    out = {}
    for j in range(lists.nlist):
        n = lists.list_size(j)
        ids = faiss.rev_swig_ptr(lists.get_ids(j), n).copy() if n else np.zeros(0, np.int64)
        codes = (faiss.rev_swig_ptr(lists.get_codes(j), n * lists.code_size).copy()
                 if n else np.zeros(0, np.uint8))
        out[j] = (ids, codes)
    return out


# IVF300: list numbers past one byte (and nlist past 256 lists caught a freed sizes array).
KEYS = ["IVF16,Flat", "IVF300,Flat", "IVF16,PQ8x4", "IVF32,SQ8", "OPQ8,IVF16,PQ8x4",
        "IVF16_HNSW8,Flat"]


@pytest.mark.parametrize("key", KEYS)
def test_encode_part_gives_the_lists_add_with_ids_gives(key):
    x = clustered_unit_vectors(3_000, DIM, clusters=20, seed=1)
    index = trained(key, x)
    reference = faiss.clone_index(index)
    reference.add_with_ids(x[1_000:2_000], np.arange(1_000, 2_000, dtype=np.int64))
    part = ondisk.encode_part(index, x[1_000:2_000], first_row=1_000)
    expected = in_memory_lists(reference)
    for j, (ids, codes) in expected.items():
        a, b = part.starts[j], part.starts[j + 1]
        np.testing.assert_array_equal(part.ids[a:b], ids)
        np.testing.assert_array_equal(part.codes[a:b].reshape(-1), codes)


@pytest.mark.parametrize("key", ["IVF16,Flat", "IVF300,Flat", "OPQ8,IVF16,PQ8x4"])
def test_merged_parts_after_old_lists_equal_one_in_memory_index(key, tmp_path, monkeypatch):
    """An update's shape: old on-disk lists, then two new parts, merged a few lists at a time
    (a chunk smaller than one list, too), read back as search reads it."""
    x = clustered_unit_vectors(4_000, DIM, clusters=20, seed=2)
    index = trained(key, x)
    ivf = faiss.extract_index_ivf(index)
    reference = faiss.clone_index(index)
    reference.add_with_ids(x, np.arange(len(x), dtype=np.int64))

    parts = []
    for i, (a, b) in enumerate([(0, 1_500), (1_500, 2_500), (2_500, 4_000)]):
        path = tmp_path / f"part-{i}.lists"
        ondisk.encode_part(index, x[a:b], first_row=a).write(path)
        parts.append(ondisk.PartFile(path, ivf.nlist, ivf.code_size))

    base = faiss.clone_index(index)
    ondisk.merge_parts(base, parts[:1], tmp_path / "base.ivfdata", chunk_bytes=1 << 20)
    faiss.write_index(base, str(tmp_path / "base.faiss"))
    base = faiss.read_index(str(tmp_path / "base.faiss"),
                            faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY)
    old = ondisk.OnDiskLists(tmp_path / "base.ivfdata", faiss.extract_index_ivf(base).invlists)

    merged = faiss.clone_index(index)
    ondisk.merge_parts(merged, [old, *parts[1:]], tmp_path / "all.ivfdata", chunk_bytes=64)
    assert merged.ntotal == len(x)
    faiss.write_index(merged, str(tmp_path / "all.faiss"))
    del merged
    loaded = faiss.read_index(str(tmp_path / "all.faiss"),
                              faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY)
    got, expected = in_memory_lists(loaded), in_memory_lists(reference)
    for j in expected:
        np.testing.assert_array_equal(got[j][0], expected[j][0])
        np.testing.assert_array_equal(got[j][1], expected[j][1])
    for searcher in (loaded, reference):
        faiss.extract_index_ivf(searcher).nprobe = 4
    s1, i1 = loaded.search(x[:100], 10)
    s2, i2 = reference.search(x[:100], 10)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_array_equal(s1, s2)


def test_a_damaged_part_is_refused(tmp_path):
    x = clustered_unit_vectors(500, DIM, clusters=5, seed=3)
    index = trained("IVF8,Flat", x)
    path = tmp_path / "p.lists"
    ondisk.encode_part(index, x, first_row=0).write(path)
    with open(path, "r+b") as fh:
        fh.truncate(path.stat().st_size - 10)
    with pytest.raises(ValueError, match="p.lists"):
        ondisk.PartFile(path, 8, faiss.extract_index_ivf(index).code_size)


def test_list_ranges_cover_every_list_once_within_the_chunk():
    sizes = np.array([5, 0, 30, 1, 1, 1, 0, 12], np.int64)
    offsets = np.r_[0, np.cumsum(sizes)]
    for chunk in (1, 4, 10, 100):
        ranges = ondisk.list_ranges(offsets, chunk)
        assert [a for a, _ in ranges] == [0] + [b for _, b in ranges[:-1]]
        assert ranges[-1][1] == len(sizes)
        for a, b in ranges:
            assert b - a == 1 or offsets[b] - offsets[a] <= chunk


@pytest.mark.parametrize("kind", ["int8", "fp16", "fp32"])
def test_rescore_file_reads_match_slicing_the_file(tmp_path, kind):
    x = clustered_unit_vectors(5_000, DIM, clusters=10, seed=4)
    spec = rescore.Rescore(kind)
    calibration = rescore.calibrate(x[:1_000])
    stored = rescore.encode(x, spec, calibration)
    path = tmp_path / "r"
    path.write_bytes(stored.tobytes())
    reader = rescore.RescoreFile(path, spec, calibration, DIM)
    table = np.frombuffer(stored.tobytes(), np.uint8).reshape(len(x), -1)
    rng = np.random.default_rng(0)
    # Runs of neighbours (read together), far rows (read apart), both file ends.
    rows = np.unique(np.r_[0, 1, 2, 40, 41, 2_000, rng.integers(0, len(x), 300), len(x) - 1])
    np.testing.assert_array_equal(reader.read_rows(rows), table[rows])
    decoded = rescore.decode(table, spec, calibration, DIM)
    grid = rng.integers(0, len(x), (7, 9))
    np.testing.assert_array_equal(reader.vectors(grid), decoded[grid])
    with pytest.raises(IndexError, match="holds rows 0..4999"):
        reader.read_rows(np.array([3, len(x)]))


def test_rescoring_in_blocks_gives_what_one_block_gives(tmp_path, monkeypatch):
    x = clustered_unit_vectors(3_000, DIM, clusters=10, seed=5)
    spec = rescore.Rescore("fp16")
    path = tmp_path / "r"
    path.write_bytes(rescore.encode(x, spec, {}).tobytes())
    reader = rescore.RescoreFile(path, spec, {}, DIM)
    rng = np.random.default_rng(1)
    candidates = rng.integers(0, len(x), (50, 40))
    candidates[::7, -5:] = -1
    whole = rescore.rescore_candidates(x[:50], candidates, reader, 10)
    monkeypatch.setattr(rescore, "RESCORE_BLOCK_BYTES", 3 * 40 * DIM * 4)  # 3 queries a block
    blocked = rescore.rescore_candidates(x[:50], candidates, reader, 10)
    np.testing.assert_array_equal(whole[1], blocked[1])
    np.testing.assert_array_equal(whole[0], blocked[0])
    truth = np.sort(np.where(candidates >= 0,
                             np.einsum("qd,qcd->qc", x[:50],
                                       rescore.decode(rescore.encode(x, spec, {}), spec, {},
                                                      DIM)[candidates]), -np.inf),
                    axis=1)[:, ::-1][:, :10]
    np.testing.assert_allclose(whole[0], truth, rtol=1e-5, atol=1e-6)
