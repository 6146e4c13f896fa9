"""Where cells run: local worker processes (``jobs``), a shard of the grid (``shard``), or Slurm via submitit.

Each cell runs in a fresh process (``spawn``, one cell per process), so its peak memory is its own and a
crash takes down only that cell. Finished cells are skipped; a failed cell leaves ``failure.json`` and the
suite goes on. After the run the tidy table (``results.csv``) is written under the run root.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed

from ddfast.suite.cell import CellTask, cell_dir, read_json, run_cell, write_cell
from ddfast.suite.results import collect, write_table

__all__ = ["parse_shard", "select_shard", "run_suite", "pending_cells"]


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``"i/n"`` (0 ≤ i < n) → ``(i, n)``."""
    if not text:
        return None
    try:
        i, n = (int(p) for p in text.split("/"))
    except ValueError:
        raise ValueError(f"shard: expected 'i/n' with integers 0 <= i < n, got {text!r}") from None
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"shard: expected 'i/n' with 0 <= i < n, got {text!r}")
    return i, n


def select_shard(cells: list, shard: tuple[int, int] | None) -> list:
    """The cells of shard i of n: sorted by id, every n-th from the i-th (stable across machines)."""
    if shard is None:
        return list(cells)
    i, n = shard
    return [c for k, c in enumerate(sorted(cells, key=lambda c: c.id)) if k % n == i]


def _done(run_dir: str) -> bool:
    p = os.path.join(run_dir, "results.json")
    return os.path.exists(p) and read_json(p).get("status") == "done"


def pending_cells(root: str, cells: list) -> list:
    return [c for c in cells if not _done(cell_dir(root, c.id))]


def _threads(jobs: int) -> int:
    if os.environ.get("OMP_NUM_THREADS"):
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    return max(1, (os.cpu_count() or 1) // max(jobs, 1))


def _bar(total, initial, desc, progress):
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="cell", dynamic_ncols=True, position=0)


def _report_failure(cell, status: dict, failures: list, log) -> None:
    failures.append((cell, status.get("error", "")))
    log(f"FAILED {cell.label} [{cell.id}]: {status.get('error', '')} "
        f"(details: {os.path.join(status.get('run_dir', ''), 'failure.json')})")


def run_suite(config, *, jobs: int = 1, launcher: str = "local", shard: tuple[int, int] | None = None,
              progress: bool = True, inline: bool = False, cluster: str | None = None, log=print) -> dict:
    """Run the suite's (shard of) cells; returns ``{"done", "failed", "skipped", "rows", "csv"}``.

    ``launcher="local"``: ``jobs`` worker processes (``inline=True``: in this process, one after another).
    ``launcher="submitit"``: one Slurm job per cell (``cluster="local"`` runs them as local processes through
    submitit's local executor, for testing); the ``[slurm]`` table of the config gives the job parameters
    (``timeout_min``, ``slurm_partition``, ``gpus_per_node``, ``cpus_per_task``, ``tasks_per_node``, ...)."""
    if jobs < 1:
        raise ValueError(f"jobs: expected >= 1, got {jobs}")
    root = config.out
    os.makedirs(root, exist_ok=True)
    cells = select_shard(config.cells, shard)
    for c in cells:
        write_cell(root, c)
    todo = pending_cells(root, cells)
    skipped = len(cells) - len(todo)
    if skipped:
        log(f"{skipped} of {len(cells)} cells already done in {root}; running {len(todo)}")
    failures: list = []
    t0 = time.perf_counter()
    bar = _bar(len(cells), skipped, config.name, progress)
    try:
        if launcher == "submitit":
            _run_submitit(config, root, todo, failures, bar, log, cluster, progress)
        elif launcher != "local":
            raise ValueError(f"launcher: expected 'local' or 'submitit', got {launcher!r}")
        elif inline:
            for c in todo:
                status = CellTask(cell_dir(root, c.id), progress=progress)()
                if status.get("status") != "done":
                    _report_failure(c, status, failures, log)
                if bar is not None:
                    bar.update(1)
        elif todo:
            threads = _threads(jobs)
            ctx = mp.get_context("spawn")
            with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, max_tasks_per_child=1) as pool:
                futures = {pool.submit(CellTask(cell_dir(root, c.id), progress=progress, threads=threads)): c
                           for c in todo}
                for fut in as_completed(futures):
                    c = futures[fut]
                    try:
                        status = fut.result()
                    except Exception as e:  # the worker process died (killed, out of memory)
                        status = {"status": "failed", "error": f"worker process: {type(e).__name__}: {e}",
                                  "run_dir": cell_dir(root, c.id)}
                    if status.get("status") != "done":
                        _report_failure(c, status, failures, log)
                    if bar is not None:
                        bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    rows = collect(root, config.cells, suite=config.name)
    paths = write_table(rows, os.path.join(root, "results.csv"))
    done = sum(_done(cell_dir(root, c.id)) for c in cells)
    log(f"{done} of {len(cells)} cells done, {len(failures)} failed, {time.perf_counter() - t0:.1f} s; table: {paths[0]}")
    return {"done": done, "failed": failures, "skipped": skipped, "rows": rows, "csv": paths[0], "root": root}


def _run_submitit(config, root, todo, failures, bar, log, cluster, progress):
    try:
        import submitit
    except ImportError as e:
        raise RuntimeError("launcher 'submitit': install it with `pip install submitit` "
                           "(or `pip install -e \".[slurm]\"`)") from e
    executor = submitit.AutoExecutor(folder=os.path.join(root, "submitit", "%j"), cluster=cluster)
    params = {"name": f"ddfast-{config.name}", **config.slurm}
    executor.update_parameters(**params)
    jobs = []
    if todo:
        with executor.batch():
            for c in todo:
                jobs.append((c, executor.submit(CellTask(cell_dir(root, c.id), progress=False))))
        log(f"submitted {len(jobs)} cells ({executor.cluster}); job folders under {os.path.join(root, 'submitit')}")
    remaining = list(jobs)
    while remaining:
        still = []
        for c, job in remaining:
            if not job.done():
                still.append((c, job))
                continue
            try:
                status = job.result()
            except Exception as e:  # the job itself failed (killed, out of time after the requeues)
                status = {"status": "failed", "error": f"job {job.job_id}: {type(e).__name__}: {e}",
                          "run_dir": cell_dir(root, c.id)}
            if isinstance(status, list):  # a multi-task job returns one result per task; rank 0 evaluates
                status = status[0]
            if status.get("status") != "done":
                _report_failure(c, status, failures, log)
            if bar is not None:
                bar.update(1)
        remaining = still
        if remaining:
            time.sleep(1.0)


def run_one(run_dir: str, progress: bool = True) -> dict:
    """Run a single cell folder in this process (``python -m ddfast.suite cell DIR``; under ``torchrun`` for a
    distributed cell)."""
    return run_cell(run_dir, progress=progress)
