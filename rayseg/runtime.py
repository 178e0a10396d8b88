"""Where a command runs: joining or starting Ray, Ray Data's settings, and what each stage reserves.

Every command that uses Ray (segment, nightly, evaluate, train, demo) starts here, so a cluster address,
the embedded Ray's settings and the actor pool's size are decided the same way everywhere.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

import ray

from rayseg import storage
from rayseg.config import actor_range

log = logging.getLogger("rayseg")

# Ray kills an idle worker process after 1 s once a node has more workers than CPUs, and the predictor actors are
# workers too: with one actor per core the light stages' workers would be killed and restarted between tasks.
# A cluster sets the same through RAY_num_workers_soft_limit (cluster/).
LOCAL_SYSTEM_CONFIG = {"num_workers_soft_limit": 4 * (os.cpu_count() or 1) + 4}

# What a CPU predictor actor reserves, per torch thread: a core's worth would leave no logical CPU for the light
# stages on a small machine, and Ray's CPUs are only a scheduling budget, so the actors take 3/4 of theirs and the
# OS shares the cores.
CPU_ACTOR_SHARE = 0.75

# Ray resources of the light stages: fractions, so they run beside the actors. Read and decode must differ from each
# other and from the actor's, because Ray Data fuses neighbouring stages with equal resources: read fused with
# decode would take many shards in one task (no streaming), and decode fused into the actor would run serially
# with the model. Encode and the Parquet write are equal on purpose, so an encoded batch is written where it was
# made. Read at 0.2 rather than less bounds the read-ahead, and so the memory, beside one actor per core.
READ_CPUS, DECODE_CPUS, ENCODE_CPUS = 0.2, 0.25, 0.25
WRITE_ARGS = {"num_cpus": ENCODE_CPUS}


def ensure_ray(address: str | None, quiet: bool = False) -> None:
    """Join the cluster at --address / RAY_ADDRESS, or start Ray embedded in this process."""
    if ray.is_initialized():
        return
    # "local" rather than None: ray.init() alone would quietly join whatever Ray already runs on this machine
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    extra = {"_system_config": LOCAL_SYSTEM_CONFIG} if address == "local" else {}
    ray.init(address=address, log_to_driver=not quiet, configure_logging=True, logging_level=logging.WARNING, **extra)
    log.info("Ray %s, resources %s", ray.__version__, {k: v for k, v in ray.cluster_resources().items() if "node:" not in k})


def configure_data(quiet: bool, progress_bars: bool = True) -> None:
    """Ray Data's settings for a command: progress bars only in a terminal, and storage errors worth a retry.

    Ray Data retries a Parquet file write whose error matches `retried_io_errors`; a retried write task rewrites
    the same file name (write uuid + task index), so a retry replaces a file, never adds one. Its defaults only
    know pyarrow's own S3 messages; ours come through fsspec.
    """
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = progress_bars and not quiet and sys.stderr.isatty()
    with warnings.catch_warnings():  # Ray warns on any change of the list; ours are valid regular expressions too
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.retried_io_errors = list(dict.fromkeys([*ctx.retried_io_errors, *storage.RETRIED_IO_ERRORS]))


def cluster_summary() -> dict:
    res = ray.cluster_resources()
    return {"nodes": sum(n["Alive"] for n in ray.nodes()), "CPU": res.get("CPU", 0), "GPU": res.get("GPU", 0)}


def actor_plan(cfg) -> tuple[tuple[int, int], dict, int]:
    """(pool min:max, ray resources per actor, torch threads per actor) from the cluster's resources.

    On GPUs (`--device cuda`, or `auto` on a cluster with GPUs up now): one GPU per actor, the pool growing
    from MIN to MAX of `--actors` (default 1 to the GPUs up now) as Ray Data asks for actors, so an autoscaler
    adds GPU nodes up to MAX even when none is up at the start. On CPUs: one single-threaded actor per core
    (`--threads N`: one per N cores), all started at once. Independent models on separate cores beat one model
    spread over them with intra-op threads: no barrier between the cores, and while one actor encodes its batch
    the others compute (docs/PERFORMANCE.md). `--actors` fixes the pool; each then gets an equal share of the cores.
    """
    res = ray.cluster_resources()
    gpus, cpus = int(res.get("GPU", 0)), max(1, int(res.get("CPU", 1)))
    use_gpu = cfg.device == "cuda" or (cfg.device == "auto" and gpus > 0)
    if use_gpu:
        pool = actor_range(cfg.actors) if cfg.actors else (1, max(1, gpus))
        if gpus == 0:
            log.info("the predictor pool waits for its first GPU: none is up now; it asks for 1 GPU per actor, %d to %d "
                     "actors, for an autoscaler to add", *pool)
        return pool, {"num_gpus": 1, "num_cpus": 1}, 1
    fixed = actor_range(cfg.actors) if cfg.actors else None
    threads = cfg.threads or (max(1, cpus // fixed[1]) if fixed else 1)
    pool = fixed or (max(1, cpus // threads),) * 2
    return pool, {"num_cpus": round(CPU_ACTOR_SHARE * min(threads, cpus / pool[1]), 4)}, threads


def actor_pool(pool: tuple[int, int]) -> ray.data.ActorPoolStrategy:
    return ray.data.ActorPoolStrategy(min_size=pool[0], max_size=pool[1])
