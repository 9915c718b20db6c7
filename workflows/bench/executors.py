"""Where bench cells run: one after another in this process (``local``), or one per worker on an existing Ray
cluster (``ray``), each with the CPUs and GPUs its cell asks for. A new executor is an entry in EXECUTORS.

An executor takes the jobs, a ``record`` callback it calls with each cell's result as soon as that cell ends
(in the order they end), and a log.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional

from workflows.bench.cell import CellJob, run_cell

Record = Callable[[dict[str, Any]], None]
Executor = Callable[[list[CellJob], Record, Callable[[str], None]], None]


class ExecutorError(RuntimeError):
    """An executor that cannot start: the message says what to install or which address to give."""


def run_local(jobs: list[CellJob], record: Record, log: Callable[[str], None]) -> None:
    """One cell after another, here: one engine at a time."""
    for job in jobs:
        record(run_cell(job, log))


def _cell_on_worker(job: CellJob) -> dict[str, Any]:
    return run_cell(job, print)  # a worker's output reaches the driver's terminal through Ray's log forwarding


class RayExecutor:
    """Cells as Ray tasks on the cluster at ``address``. Each worker runs the qserve installed on its node (a cell
    starts ``qserve serve`` and the engine there, so they must be installed anyway); the data and cache folders
    are passed on as paths (a cluster of other machines needs them at the same paths, or its own)."""

    def __init__(self, address: Optional[str]) -> None:
        try:
            import ray
        except ImportError:
            raise ExecutorError("--executor ray needs Ray: pip install ray (scripts/setup.sh installs it)") from None
        if not address:
            raise ExecutorError("--executor ray needs --address HOST:PORT of a running Ray cluster (`ray start --head` "
                                "prints it), or 'auto' for the cluster this machine belongs to")
        _check_reachable(address)
        self.ray = ray
        env = {k: v for k, v in {"QSERVE_DATA": _data_dir(), "QSERVE_CACHE": os.environ.get("QSERVE_CACHE"),
                                 "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE")}.items() if v}
        try:
            ray.init(address=address, runtime_env={"env_vars": env},
                     log_to_driver=True, logging_level="WARNING")
        except ConnectionError as exc:
            raise ExecutorError(f"cannot reach a Ray cluster at {address}: {str(exc).splitlines()[0]}; start one "
                                f"with `ray start --head` and pass the address it prints") from None

    def __call__(self, jobs: list[CellJob], record: Record, log: Callable[[str], None]) -> None:
        ray = self.ray
        task = ray.remote(max_retries=0)(_cell_on_worker)
        pending = {task.options(num_cpus=j.cell.cpus, num_gpus=j.cell.gpus).remote(j): j for j in jobs}
        log(f"{len(pending)} cell(s) submitted to the Ray cluster")
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            job = pending.pop(done[0])
            try:
                record(ray.get(done[0]))
            except ray.exceptions.RayError as exc:  # the worker died: the cell failed, the others go on
                message = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                record({"status": "failed", "error": f"{type(exc).__name__}: {message}", "cell": job.cell.name,
                        "recipe": job.cell.recipe(), "target": job.cell.target, "seconds": 0.0})

    def close(self) -> None:
        self.ray.shutdown()


def _check_reachable(address: str) -> None:
    """Fails at once when nothing listens at HOST:PORT (Ray itself retries for a minute before it says so)."""
    import socket

    host, _, port = address.removeprefix("ray://").rpartition(":")
    if address == "auto" or not host or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as exc:
        raise ExecutorError(f"cannot reach a Ray cluster at {address}: {exc.strerror or exc}; start one with "
                            f"`ray start --head` and pass the address it prints") from None


def _data_dir() -> Optional[str]:
    from core.data import DataDirError, data_dir

    try:
        return str(data_dir())
    except DataDirError:
        return None


EXECUTORS: dict[str, Callable[[Optional[str]], Executor]] = {
    "local": lambda address: run_local,
    "ray": RayExecutor,
}


def get_executor(name: str, address: Optional[str] = None) -> Executor:
    """The executor called ``name``; ``address`` is the cluster's (Ray)."""
    if name not in EXECUTORS:
        raise ExecutorError(f"unknown executor {name!r}; choose one of {', '.join(EXECUTORS)}")
    if name == "local" and address:
        raise ExecutorError("--address is for --executor ray; the local executor runs cells here")
    return EXECUTORS[name](address)
