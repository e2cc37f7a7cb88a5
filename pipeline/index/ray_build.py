"""`build-index --ray`: the shards' work of a streamed build (streamed.shard_work: the IVF part
of each shard, its rescore rows, the held-out queries' exact top-k in it) in Ray tasks.

The driver reads each embedding shard (as it would locally), puts its vectors in the object
store and keeps a bounded window of tasks in flight; results come back in row order, and the
driver writes the parts and merges them into the on-disk lists (streamed.add_shards). A task
is a pure function of (plan, shard), so a task Ray retries after a lost worker gives the
same bytes, and the index is the local build's.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator

from pipeline.index.streamed import Plan, ShardResult, shard_work

# Tasks in flight per CPU of the cluster: enough to keep every worker busy while the driver
# reads the next shard, few enough that pending shards don't fill the object store.
TASKS_PER_CPU = 2


def _work(plan: Plan, first_row: int, vectors) -> ShardResult:
    import faiss

    faiss.omp_set_num_threads(1)  # one task per CPU: threads would only contend
    return shard_work(plan, first_row, vectors)


def ray_shard_mapper(folder, address: str, progress):
    """A streamed.build_streamed `map_shards` running the shards' work on the cluster at
    `address` (ray_cluster.ADDRESS_HELP)."""
    from pipeline import ray_cluster

    summary = ray_cluster.connect(address)
    progress(f"ray: {summary['nodes']} node(s), {summary['cpus']:.0f} CPU(s)")
    window = max(1, int(summary["cpus"] * TASKS_PER_CPU))

    def run(plan: Plan, shards: Iterable) -> Iterator[ShardResult]:
        import ray

        task = ray.remote(num_cpus=1, max_retries=3)(_work)
        plan_ref = ray.put(plan)
        pending: deque = deque()
        for first_row, vectors in shards:
            pending.append(task.remote(plan_ref, first_row, ray.put(vectors)))
            while len(pending) >= window:
                yield ray.get(pending.popleft())
        while pending:
            yield ray.get(pending.popleft())

    return run
