"""`--ray`: joining a Ray cluster, and handing its workers what they need from this machine.

The stages' Ray engines (embed/engines/ray.py, text/ray_tokenize.py) run their work in Ray
workers that may be on other hosts: nothing here assumes they share this machine's home
directory. The files a worker needs (the model's checkpoint, GPT-2's ranks file) travel
through Ray's object store (`ship_files`; the checkpoint by a task on this machine, in the
background: `ship_files_later`) and are written to the worker's own temp folder
(`unpack_files`), unless an embed actor sees the driver's checkpoint folder with the same
weights and loads it there; the corpus and the token shards are read where they are, through
pyarrow's filesystems (`read_bytes`: a path on a shared filesystem, or an object-store URI).
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

from pipeline.errors import MissingExtra, UsageError, pip_install

ADDRESS_HELP = ("auto (the cluster `ray start` runs here), local (a cluster in this process, "
                "on this machine's cores), ray://HOST:PORT (Ray Client) or HOST:PORT (a head "
                "node's GCS)")


def require_ray():
    """The `ray` module, or a one-line error naming the extra that installs it."""
    try:
        import ray
        import ray.data  # noqa: F401  (the engines use Ray Data; it has its own dependencies)
    except ImportError as err:
        raise MissingExtra(f"--ray needs Ray Data ({err.name} is missing): "
                           f"{pip_install('ray')}, or `make index RAY=local`") from None
    return ray


def connect(address: str) -> dict:
    """Join the cluster `address` names (ADDRESS_HELP), or keep the one this process is
    connected to already (a test's, or a notebook's); returns `cluster_summary()`."""
    if address not in ("auto", "local") and ":" not in address:
        raise UsageError(f"--ray {address!r}: expected {ADDRESS_HELP}")
    # Ray's C++ core logs to this terminal, e.g. an "error" that an actor's constructor
    # arguments live in the object store, where Ray Data puts them; what goes wrong reaches
    # us as a Python exception (its logs stay in Ray's session folder).
    prepare_environment(local=address == "local")
    ray = require_ray()
    # Token authentication, Ray's default for a new cluster, without its warning that it is.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(
        logging.ERROR)
    if not ray.is_initialized():
        quiet = {"log_to_driver": False, "logging_level": logging.WARNING}
        try:
            if address == "local":
                ray.init(num_cpus=os.cpu_count(), include_dashboard=False, **quiet)
            else:
                ray.init(address=address, **quiet)
        except ConnectionError as err:
            hint = ("start one with `ray start --head`, or use --ray local" if address == "auto"
                    else "is its head node up and reachable from here?")
            raise UsageError(f"--ray {address}: no Ray cluster found ({first_line(err)}): "
                             f"{hint}") from None
    quiet_ray_data()
    return cluster_summary()


def prepare_environment(local: bool) -> None:
    """Ray's settings for this driver, read when `ray` (and `ray.data`) are first imported,
    so set before that:

    - a cluster started by this process (`local`) listens on loopback only: a one-machine
      cluster has no business on the network. Ray binds its servers to the node's address,
      which it takes to be 127.0.0.1 only where clusters are "not enabled" (its setting for
      macOS and Windows);
    - Ray Data shares a cluster's resources among the datasets running on it, each by
      requests its driver renews every 10 s and which lapse 180 s after the last: a driver
      killed mid-stage left its rerun no CPU for three minutes. Ours lapse after 30 s.
    """
    if local:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_DATA_AUTOSCALING_REQUEST_EXPIRE_TIME_S", "30")


def first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def quiet_ray_data() -> None:
    """Our own progress bar and summary stand for Ray Data's: its bars and per-operator log
    lines would interleave with them on the terminal (they stay in Ray's log files)."""
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)


def cluster_summary() -> dict:
    """The cluster's size as Ray reports it: nodes alive, CPUs and GPUs in all."""
    import ray

    resources = ray.cluster_resources()
    return {"nodes": sum(1 for node in ray.nodes() if node.get("Alive")),
            "cpus": float(resources.get("CPU", 0)), "gpus": float(resources.get("GPU", 0))}


def ship_files(paths: dict[str, Path]):
    """The files, by the name each gets on a worker, put in the object store once; a worker
    turns the reference back into files with `unpack_files`."""
    import ray

    return ray.put({name: Path(path).read_bytes() for name, path in paths.items()})


def ship_files_later(paths: dict[str, Path]):
    """As `ship_files`, but returns at once: a task on this machine (the driver's node)
    reads the files into the object store while the caller gets on, so the actors start
    without waiting for a model's weights that they may read where they are anyway. From a
    Ray Client driver (this machine is no node of the cluster), `ship_files`."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if ray.util.client.ray.is_connected():
        return ship_files(paths)
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    reader = ray.remote(num_cpus=0, scheduling_strategy=here)(read_files)
    return reader.remote({name: str(Path(path).resolve()) for name, path in paths.items()})


def read_files(paths: dict[str, str]) -> dict[str, bytes]:
    """The files' bytes by name (`ship_files_later`'s task)."""
    return {name: Path(path).read_bytes() for name, path in paths.items()}


def unpack_files(files: dict[str, bytes], prefix: str) -> Path:
    """Write shipped files into a new temp folder of this worker; returns the folder (it
    lives as long as the worker: Ray removes its session's temp files)."""
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


def read_bytes(location: str) -> bytes:
    """A file's bytes by path or URI (file://, s3://, gs://, hdfs://: pyarrow's filesystems)."""
    import pyarrow.fs

    filesystem, path = pyarrow.fs.FileSystem.from_uri(location if "://" in location
                                                      else os.path.abspath(location))
    with filesystem.open_input_stream(path) as stream:
        return stream.readall()


def worker_name() -> str:
    """This Ray worker, as the stage summaries name it: node address and process id."""
    import ray

    return f"{ray.util.get_node_ip_address()} pid {os.getpid()}"
