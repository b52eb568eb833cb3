"""Wait for a submitted SLURM job and return its tasks' results (``hpcvideo submit --wait``).

submitit's own ``Job.results()`` asks SLURM (``sacct``) for the job's state at 2, 4, 8, 16, 32 s and then
every 60 s after the submission, and for a task that ended without its result file it waits 15 s more
(a shared file system may show the file late). A hpcvideo job whose rank fails writes no result file at
all: the failed rank's peers leave with ``os._exit(1)`` (:mod:`hpcvideo.runtime.failure`). So a job that
failed 20 s after its submission was reported about 45 s after it. :func:`wait_for_results` asks for the
state every ``poll_s`` seconds instead (one ``sacct`` call each) and, once SLURM reports the job ended in
any state other than COMPLETED (FAILED, CANCELLED, TIMEOUT, OUT_OF_MEMORY, ...), gives the result files
only ``grace_s`` seconds: every task has ended by then, and the error it reports (submitit's
``UncompletedJobError`` or ``FailedJobError``) carries the tasks' logs either way. A COMPLETED job keeps
submitit's 15 s for its result files. A requeued job (PENDING, REQUEUED) is waited for like a running one.
"""

from __future__ import annotations

import time
from typing import Any

import submitit


def wait_for_results(job: submitit.Job, *, poll_s: float = 1.0, grace_s: float = 2.0) -> list[Any]:
    """Every task's return value of ``job`` (a list, task 0 first), once the job has ended.

    ``poll_s``: seconds between two state queries to SLURM; ``grace_s``: seconds to wait for a missing
    result file of a job that SLURM reports ended in another state than COMPLETED.

    Raises what ``job.results()`` raises: the first failed task's ``FailedJobError`` (its traceback) or
    ``UncompletedJobError`` (no result file: the task's stderr log)."""
    tasks = [job.task(i) for i in range(job.num_tasks)]
    while not all(task.paths.result_pickle.exists() for task in tasks):
        if job.watcher.is_done(job.job_id, mode="force"):
            break
        time.sleep(poll_s)
    state = job.watcher.get_state(job.job_id, mode="cache").upper()
    if not state.startswith("COMPLETED"):
        for task in tasks:  # every task has ended: a result file that is not there now will not come
            task._results_timeout_s = min(task._results_timeout_s, grace_s)
    return job.results()
