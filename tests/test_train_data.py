"""Training data: batch plans, token tables, text files."""

import numpy as np
import pytest

from pipeline.train.data import TokenTable, plan_epoch, read_texts


@pytest.mark.parametrize("n, batch", [(1000, 32), (100, 7), (5, 8), (64, 64)])
def test_plan_epoch(n, batch):
    rng = np.random.default_rng(n)
    lengths = rng.integers(1, 200, size=n)
    plan = plan_epoch(lengths, batch, seed=3, stream=0, epoch=0)
    flat = np.concatenate(plan)
    assert len(set(flat.tolist())) == len(flat)  # nothing twice
    if n >= batch:
        assert all(len(b) == batch for b in plan) and len(plan) == n // batch
    else:
        assert len(plan) == 1 and len(plan[0]) == n
    again = plan_epoch(lengths, batch, seed=3, stream=0, epoch=0)
    assert all(np.array_equal(x, y) for x, y in zip(plan, again, strict=True))
    if n > 2 * batch:
        other = plan_epoch(lengths, batch, seed=3, stream=0, epoch=1)
        assert not all(np.array_equal(x, y) for x, y in zip(plan, other, strict=True))
        # Length-sorted chunks: batches are much more uniform than random ones.
        spread = np.mean([lengths[b].max() - lengths[b].min() for b in plan])
        assert spread < 0.5 * np.ptp(lengths)


def test_token_table():
    table = TokenTable.build([[1, 2, 3], [], [4, 5, 6, 7, 8]], max_tokens=4)
    assert table.lengths.tolist() == [3, 1, 4]
    assert [r.tolist() for r in table.rows([2, 0])] == [[4, 5, 6, 7], [1, 2, 3]]


def test_read_texts(tmp_path):
    import lzma

    (tmp_path / "a.txt").write_text("one\n\n  two  \n")
    with lzma.open(tmp_path / "b.txt.xz", "wt") as fh:
        fh.write("three\nfour\n")
    assert read_texts(tmp_path / "a.txt") == ["one", "two"]
    assert read_texts(tmp_path / "b.txt.xz") == ["three", "four"]
