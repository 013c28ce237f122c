"""The Ray backend of `peftlab study`: every unfinished run is a Ray task with the study's resources.

Ray schedules the tasks over its workers (a local Ray started on demand, or a cluster at `address`)
and retries a task whose worker died; the retried run resumes from its last checkpoint. Each task
writes an ordinary run directory, atomically as always, so a lost worker never leaves a
finished-looking run, and `peftlab report` reads the study as if it had run here. Paths are those
of the directory the study was started from: on a cluster it must be shared, at the same path,
by every worker.
"""

from __future__ import annotations

import os
import time
from typing import Any

from peftlab.errors import StudyError
from peftlab.studies.running import clock
from peftlab.studies.study import PlannedRun, Study


def _train_cell(raw_config: dict[str, Any], working_dir: str, threads: int) -> dict[str, str]:
    """Runs in a Ray worker: one run, resumed from its checkpoint if an earlier attempt left one."""
    import torch

    from peftlab.config_loading import validate_config
    from peftlab.errors import NonFiniteLossError
    from peftlab.runs import is_finished
    from peftlab.training.run import train

    os.chdir(working_dir)
    torch.set_num_threads(threads)
    config = validate_config(raw_config)
    done = config.output.dir / config.output.name
    if config.output.name and is_finished(done):  # a retry of a task whose worker was lost after its run was in place
        return {"run": str(done)}
    try:
        return {"run": str(train(config, resume="auto"))}
    except NonFiniteLossError as exc:  # the run's own failure: reported, not retried
        return {"error": str(exc)}


def run_on_ray(study: Study, todo: list[PlannedRun], address: str | None, retries: int) -> dict[str, str]:
    try:
        import ray
    except ImportError:
        raise StudyError("--backend ray needs Ray: pip install 'peftlab[ray]'") from None
    resources = study.spec.resources
    ray.init(address=address, ignore_reinit_error=True, include_dashboard=False, log_to_driver=False)
    print(f"ray: {len(todo)} run(s) on {ray.cluster_resources().get('CPU', 0):g} CPU(s), "
          f"{ray.cluster_resources().get('GPU', 0):g} GPU(s); each run {resources.cpu:g} CPU, "
          f"{resources.gpu:g} GPU; a lost worker's run is retried {retries} time(s)", flush=True)
    task = ray.remote(num_cpus=resources.cpu, num_gpus=resources.gpu, max_retries=retries)(_train_cell)
    threads = max(1, int(resources.cpu))
    pending = {task.remote(planned.config.model_dump(mode="json"), os.getcwd(), threads): planned
               for planned in todo}
    failures: dict[str, str] = {}
    started = time.perf_counter()
    try:
        _collect(pending, failures, started, len(todo))
    finally:
        ray.shutdown()
    return failures


def _collect(pending: dict, failures: dict[str, str], started: float, total: int) -> None:
    import ray
    from ray.exceptions import RayError

    done = 0
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        planned = pending.pop(ready[0])
        done += 1
        try:
            outcome = ray.get(ready[0])
        except RayError as exc:  # the worker died more often than retried, or the run raised
            outcome = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0]}"}
        if "error" in outcome:
            failures[planned.path.name] = outcome["error"]
        status = f"failed: {outcome['error']}" if "error" in outcome else "finished"
        print(f"=== run {done}/{total}: {planned.path.name} ({planned.cell.label}, seed {planned.seed}) "
              f"{status}; elapsed {clock(time.perf_counter() - started)}", flush=True)
