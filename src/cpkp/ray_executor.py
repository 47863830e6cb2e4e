"""``cpkp benchmark --executor ray``: the benchmark's independent runs as Ray tasks.

The driver (the ``cpkp benchmark`` process) plans the jobs, reads the runs already finished,
hands the others to Ray and writes the tables as results come back; each task trains and tests
one run with :func:`cpkp.benchmark.run_or_record_failure`, exactly as the in-process executor
does, into its own run folder. On a cluster the output folder (and the dataset) must therefore
be at the same path on every node and on the driver, and cpkp installed in every node's Python.

Ray is an optional dependency (``pip install 'cpkp[ray]'``) and is imported only here.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from cpkp.benchmark import Job, finished_metrics, run_or_record_failure
from cpkp.errors import ConfigError, CpkpError

logger = logging.getLogger(__name__)

DEFAULT_CPUS_PER_RUN = 4  # CPU-only runs: enough threads for one small model, several runs a node
OBJECT_STORE_BYTES = 200 * 1024**2  # local instance: only jobs and metrics dicts travel
MAX_RETRIES = 1  # a run whose worker or node died is tried once more (it resumes)
CONNECT_TIMEOUT_S = 10  # --address HOST:PORT must answer within this


def import_ray() -> Any:
    """The ``ray`` module.

    Raises:
        ConfigError: Ray is not installed.
    """
    try:
        import ray
    except ImportError:
        raise ConfigError(
            "--executor ray needs Ray, which is not installed: pip install 'cpkp[ray]'"
        ) from None
    return ray


class RayExecutor:
    """Runs benchmark jobs as Ray tasks and yields ``(job, metrics)`` as each finishes.

    An executor for :func:`cpkp.benchmark.run_benchmark`. Runs finished earlier are read on
    the driver and never sent to Ray (no GPU is held to read a JSON file); Ray starts only when
    something is left to run, and stops when the last result is in, when a run stops the
    benchmark or when the caller stops iterating. A Ray connection made by the caller
    (``ray.init`` before) is used as it is and left open.

    Args:
        address: an existing cluster (``ray.init(address=...)``: ``auto``, ``HOST:PORT`` or
            ``ray://HOST:PORT``); None starts a local instance.
        num_cpus: CPUs of the local instance (None: every CPU of this machine).
        cpus_per_run: CPUs (and torch threads) given to each run; None: 1 where the runs get a
            GPU each, else ``DEFAULT_CPUS_PER_RUN`` (at most the largest node's CPUs).
        progress: show a progress bar over the runs.
        temp_dir: Ray's session folder of a local instance (None: Ray's default, /tmp/ray).

    Raises:
        ConfigError: Ray is not installed, or an option is out of range.
    """

    def __init__(
        self,
        address: str | None = None,
        num_cpus: int | None = None,
        cpus_per_run: int | None = None,
        progress: bool = True,
        temp_dir: str | Path | None = None,
    ) -> None:
        if cpus_per_run is not None and cpus_per_run < 1:
            raise ConfigError(f"--cpus-per-run {cpus_per_run}: expected at least 1")
        if num_cpus is not None and num_cpus < 1:
            raise ConfigError(f"num_cpus={num_cpus}: a local Ray instance needs at least 1 CPU")
        if address is not None and (num_cpus is not None or temp_dir is not None):
            raise ConfigError("num_cpus and temp_dir are for a local Ray instance, not --address")
        self.ray = import_ray()
        self.address = address
        self.num_cpus = num_cpus
        self.cpus_per_run = cpus_per_run
        self.progress = progress
        self.temp_dir = None if temp_dir is None else str(temp_dir)

    def __call__(self, jobs: Sequence[Job]) -> Iterator[tuple[Job, dict[str, Any]]]:
        """Yields ``(job, metrics)`` for every job: finished ones first, then in finishing order.

        Raises:
            CpkpError: a run's dataset or configuration is wrong (as in-process, this stops the
                benchmark; the other runs are cancelled and resume next time).
        """
        bar = tqdm(total=len(jobs), desc="benchmark", unit="run", disable=not self.progress)
        # Log lines (one per run) above the bar instead of through it.
        with bar, logging_redirect_tqdm() if self.progress else contextlib.nullcontext():
            left = []
            for job in jobs:
                metrics = finished_metrics(job)
                if metrics is None:
                    left.append(job)
                    continue
                bar.update(1)
                yield job, metrics
            if left:
                yield from self._run(left, bar)

    def _run(self, jobs: Sequence[Job], bar: tqdm) -> Iterator[tuple[Job, dict[str, Any]]]:
        ray = self.ray
        started = self._connect()
        pending: dict[Any, Job] = {}
        try:
            options = self._task_options(jobs)
            task = ray.remote(_run_on_worker).options(**options)
            threads = options["num_cpus"]
            gpu = " and 1 GPU" if options.get("num_gpus") else ""
            logger.info("Ray: %d runs, each on %d CPU(s)%s", len(jobs), threads, gpu)
            pending = {task.remote(_shippable(job), threads): job for job in jobs}
            while pending:
                (ref,), _ = ray.wait(list(pending), num_returns=1)
                job = pending.pop(ref)
                metrics = self._result(ref, job)
                bar.update(1)
                _log_result(job, metrics, done=bar.n, total=bar.total)
                yield job, metrics
        finally:
            for ref in pending:
                ray.cancel(ref, force=True)
            if started:
                ray.shutdown()

    def _connect(self) -> bool:
        """Start or join Ray; True when this executor did (and so must shut it down)."""
        ray = self.ray
        if ray.is_initialized():
            return False
        options: dict[str, Any] = {
            "include_dashboard": False,  # nothing to serve; one process and one port fewer
            "log_to_driver": False,  # workers' output (per-run logs) stays in Ray's session logs
            "logging_level": logging.WARNING,
        }
        if self.address is None:
            # Offline machines: Ray would otherwise try to send usage statistics.
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            options.update(num_cpus=self.num_cpus, object_store_memory=OBJECT_STORE_BYTES)
            if self.temp_dir is not None:
                options["_temp_dir"] = self.temp_dir
        else:
            _check_reachable(self.address)
            options["address"] = self.address
        try:
            ray.init(**options)
        except ConnectionError as err:
            raise ConfigError(f"--address {self.address}: no Ray cluster there ({err})") from None
        logger.info("Ray: %s", _resources_text(ray.cluster_resources()))
        return True

    def _task_options(self, jobs: Sequence[Job]) -> dict[str, Any]:
        """``num_cpus`` and ``num_gpus`` of every task: one GPU per run where GPUs exist."""
        ray = self.ray
        gpus = ray.cluster_resources().get("GPU", 0) > 0
        wants_cpu = all(job.config.get("train", {}).get("device") == "cpu" for job in jobs)
        per_gpu_run = gpus and not wants_cpu
        largest = max(
            (node["Resources"].get("CPU", 0) for node in ray.nodes() if node["Alive"]), default=0
        )
        cpus = self.cpus_per_run
        if cpus is None:
            cpus = 1 if per_gpu_run else max(1, min(DEFAULT_CPUS_PER_RUN, int(largest)))
        if cpus > largest:
            message = f"--cpus-per-run {cpus}: the largest Ray node has {largest:g} CPUs"
            if self.address is None:
                raise ConfigError(message)
            logger.warning("%s; the runs wait until the cluster grows", message)
        return {"num_cpus": cpus, "max_retries": MAX_RETRIES} | (
            {"num_gpus": 1} if per_gpu_run else {}
        )

    def _result(self, ref: Any, job: Job) -> dict[str, Any]:
        """A task's metrics; a lost worker or node is a failed run, a user mistake stops all."""
        ray = self.ray
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as err:
            if isinstance(err.cause, CpkpError):
                raise err.cause from None
            raise
        except ray.exceptions.RayError as err:
            # A dead worker (killed for memory, a lost node) fails only its run, after one retry:
            # a sweep of hours on a cluster goes on, and the next invocation resumes the run.
            message = f"Ray lost the run: {type(err).__name__}: {err}".splitlines()[0]
            return {"error": message}


def _check_reachable(address: str) -> None:
    """Fail in seconds on a wrong ``HOST:PORT``, where ``ray.init`` retries for minutes."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return  # "auto" or a form Ray resolves itself
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as err:
        raise ConfigError(
            f"--address {address}: cannot reach {host}:{port} ({err}); is the Ray head running "
            "there (ray start --head) and the port open?"
        ) from None


def _run_on_worker(job: Job, threads: int) -> dict[str, Any]:
    """One run inside a Ray worker, with as many torch threads as CPUs given to the task."""
    import torch

    torch.set_num_threads(threads)
    return run_or_record_failure(job, progress=False)


def _shippable(job: Job) -> Job:
    """The job with an absolute run folder: a worker's working folder is not the driver's."""
    return replace(job, run_dir=str(Path(job.run_dir).absolute()))


def _log_result(job: Job, metrics: dict[str, Any], done: int, total: int) -> None:
    where = f"{job.category} {job.label} seed {job.seed} ({done}/{total})"
    if "error" in metrics:
        logger.error("%s failed: %s", where, metrics["error"])
        return
    fused = metrics.get("fused", {}).get("overall", {})
    logger.info(
        "%s: image AUROC %s, pixel AUROC %s",
        where,
        _number(fused.get("image_auroc")),
        _number(fused.get("pixel_auroc")),
    )


def _number(value: Any) -> str:
    return "undefined" if value is None else f"{float(value):.3f}"


def _resources_text(resources: dict[str, float]) -> str:
    return ", ".join(f"{resources.get(key, 0):g} {key}" for key in ("CPU", "GPU"))
