"""Where a command runs: joining or starting Ray, Ray Data's settings, and what each stage reserves.

Every command that uses Ray (segment, nightly, evaluate, train, demo) starts here, so a cluster address,
the embedded Ray's settings and the actor pool's size are decided the same way everywhere.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import sys
import threading
import time
import warnings

import ray

from rayseg import storage
from rayseg.console import console
from rayseg.config import actor_range
from rayseg.errors import EnvError

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
# nightly's write stage and the tasks a wave's commit waits for (split, copy, merge files): no CPU reservation, so
# that they run as soon as there are rows to write. Ray Data reserves CPUs for upstream stages first and lets the
# last stage wait "for upstream ops to finish" (its resource manager): at ENCODE_CPUS a 2-core run of 800 images
# committed its first wave after 680 were done, whatever --commit-seconds said; at 0.05 CPU the first wave of a
# 200-image run still came after 188 were done. They are light (a Parquet encode of rows already encoded, a copy).
COMMIT_TASK_ARGS = {"num_cpus": 0}


def ensure_ray(address: str | None, quiet: bool = False, dashboard: bool = False) -> None:
    """Join the cluster at --address / RAY_ADDRESS, or start Ray embedded in this process (with its dashboard only
    if asked: the embedded case does not need it, and it costs seconds of start-up, docs/PERFORMANCE.md).

    A failure to start or reach Ray that has a known cause is an EnvError: one sentence with what to try. An address
    where nothing accepts a connection says so in seconds, not after Ray's own connect budget (minutes).
    """
    global dashboard_on, joined
    if ray.is_initialized():
        return
    address = ray_address(address)
    extra = {"_system_config": LOCAL_SYSTEM_CONFIG, "include_dashboard": dashboard} if address == "local" else {}
    con = console()
    level = logging.INFO if con else logging.WARNING  # with a console, Ray's INFO lines go to its log file
    try:
        probe(address)
        context = ray.init(address=address, log_to_driver=not quiet, configure_logging=True, logging_level=level, **extra)
    except Exception as e:  # noqa: BLE001 - a known cause becomes one sentence, anything else keeps its traceback
        sentence = start_failure(e, address)
        if sentence is None:
            raise
        log.debug("Ray did not start", exc_info=True)  # the whole story, in the log file where there is one
        raise EnvError(sentence) from None
    dashboard_on = bool(getattr(context, "dashboard_url", None))
    joined = None if address == "local" else address
    if con:
        con.ray_started()
    log.info("Ray %s, resources %s", ray.__version__, {k: v for k, v in ray.cluster_resources().items() if "node:" not in k})


def ensure_ray_beside(work, address: str | None, quiet: bool = False, dashboard: bool = False):
    """ensure_ray, while `work()` (imports, the model check) runs on a thread; returns what work returns.

    Ray's processes start while the driver does its own start-up work. Ray starts on this thread, not the other:
    Linux ties a child's parent-death signal to the thread that started it (Ray's processes would die with a
    finished thread), and only the main thread can set Ray's SIGTERM handler. If work fails, its error goes on
    (a bad checkpoint is still one sentence), and a Ray started here is shut down first.
    """
    was_up, done, failed = ray.is_initialized(), [], []

    def run():
        try:
            done.append(work())
        except BaseException as e:  # noqa: BLE001 - raised again in the caller's thread
            failed.append(e)

    thread = threading.Thread(target=run, name="rayseg-start-up", daemon=True)
    thread.start()
    try:
        ensure_ray(address, quiet, dashboard)
    finally:
        thread.join()
    if failed:
        if not was_up and ray.is_initialized():
            ray.shutdown()
        raise failed[0]
    return done[0]


def ray_address(address: str | None) -> str:
    """Where a command's Ray is: --address, else RAY_ADDRESS, else the Ray `ray start` runs on this machine, else
    "local" (embedded). "local" rather than None: ray.init() alone would also join another program's Ray."""
    return address or os.environ.get("RAY_ADDRESS") or running_local_ray() or "local"


def running_local_ray() -> str | None:
    """The address of the Ray that `ray start --head` runs on this machine, if its GCS is up; else None.

    A command without --address joins it (and says so) instead of starting a Ray of its own: Ray's start is then paid
    once, not by every command (worker processes belong to a job, so each command still starts its actors). Only a Ray that `ray start` announced
    (RAY_TMPDIR or /tmp/ray `ray_current_cluster`) and whose GCS process is alive counts: a stale file, or another
    program's embedded Ray, does not. `--address local` always starts a private embedded Ray.
    """
    from ray._private.services import find_bootstrap_address, find_gcs_addresses

    try:
        address = find_bootstrap_address(None)
        if not address or address not in find_gcs_addresses():
            return None
    except Exception:  # noqa: BLE001 - an unreadable temp dir or process table: start embedded, as without one
        log.debug("looking for a running Ray failed", exc_info=True)
        return None
    log.info("joining the Ray already running on this machine at %s (from `ray start`); --address local starts a "
             "private one instead", address)
    return address


dashboard_on = False  # whether the Ray this process started or joined has a dashboard
joined: str | None = None  # the address of the Ray this process joined; None where it started its own
PROBE_S = 10.0  # how long an address may refuse connections before rayseg says nothing answers there


def probe(address: str, within: float = PROBE_S) -> None:
    """A ConnectionError unless something accepts a TCP connection at a host:port address within `within` seconds.

    Ray itself retries a GCS that does not answer for many minutes before it gives up; a mistyped address or a
    cluster that is down deserves the sentence at once. "local", "auto" and addresses without a port are Ray's to
    resolve.
    """
    import socket

    m = re.fullmatch(r"(?:ray://)?\[?([^\]/]+?)\]?:(\d+)/?", address)
    if m is None:
        return
    deadline, error = time.monotonic() + within, None
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((m.group(1), int(m.group(2))), timeout=min(3.0, within)):
                return
        except OSError as e:  # refused, unreachable, no such host: tried again until the deadline
            error = e
            time.sleep(0.5)
    raise ConnectionError(f"Failed to connect to Ray cluster at {address}: nothing accepted a connection in {within:g} s ({error})")


def start_failure(e: Exception, address: str) -> str | None:
    """The sentence for a known reason Ray failed to start or to be reached, else None."""
    text = f"{e} {e.__cause__ or ''}"
    where = "on this machine" if address == "local" else f"at {address}"
    if isinstance(e, ConnectionError) or "Failed to connect to" in text:
        return (f"no Ray cluster answered at {address}: check the address and that the cluster is up (`ray status` on its "
                "head node), or leave out --address and RAY_ADDRESS to start Ray here")
    if "timed out" in text.lower():
        return (f"Ray timed out while starting {where}, which usually means the machine is short of CPU or memory or a "
                "Ray from an earlier run is still there: run `ray stop`, close what you can, and try again")
    if "already occupied" in text or "already in use" in text or getattr(e, "errno", None) in (48, 98):
        return (f"a port Ray needs {where} is already taken, often by a Ray left running: run `ray stop`, or join that Ray "
                "with --address auto")
    if "object store" in text or "plasma" in text or "/dev/shm" in text or getattr(e, "errno", None) == 28:
        return ("there is no room for Ray's object store (shared memory in /dev/shm, or the temporary folder): free space "
                "there, or give the container more shared memory (docker run --shm-size=4g)")
    return None


def configure_data(quiet: bool, progress_bars: bool = True) -> None:
    """Ray Data's settings for a command: progress bars only in a terminal, and storage errors worth a retry.

    With the rayseg console (a terminal, no --verbose) rayseg draws its own progress line, so Ray Data's bars are
    off. Ray Data retries a Parquet file write whose error matches `retried_io_errors`; a retried write task
    rewrites the same file name (write uuid + task index), so a retry replaces a file, never adds one. Its defaults
    only know pyarrow's own S3 messages; ours come through fsspec.
    """
    ctx = ray.data.DataContext.get_current()
    con = console()
    ctx.enable_progress_bars = progress_bars and not quiet and sys.stderr.isatty() and con is None
    if con:
        con.route_ray_loggers()  # Ray Data's loggers exist once ray.data is imported
    with warnings.catch_warnings():  # Ray warns on any change of the list; ours are valid regular expressions too
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.retried_io_errors = list(dict.fromkeys([*ctx.retried_io_errors, *storage.RETRIED_IO_ERRORS]))


def cluster_summary() -> dict:
    res = ray.cluster_resources()
    return {"nodes": sum(n["Alive"] for n in ray.nodes()), "CPU": res.get("CPU", 0), "GPU": res.get("GPU", 0)}


# A second CPU actor pays for its start-up (about 5 CPU-seconds: a process, Ray Data, torch, the model) only on a job
# of more batches than this per actor: on 2 cores a 20-image job (2 batches) finished 1.4-2.6 s sooner with 1 actor.
BATCHES_PER_ACTOR = 8


def actor_plan(cfg, batches: int | None = None) -> tuple[tuple[int, int], dict, int]:
    """(pool min:max, ray resources per actor, torch threads per actor) from the cluster's resources.

    On GPUs (`--device cuda`, or `auto` on a cluster with GPUs up now): one GPU per actor, the pool growing
    from MIN to MAX of `--actors` (default 1 to the GPUs up now) as Ray Data asks for actors, so an autoscaler
    adds GPU nodes up to MAX even when none is up at the start. On CPUs: one single-threaded actor per core
    (`--threads N`: one per N cores), all started at once. Independent models on separate cores beat one model
    spread over them with intra-op threads: no barrier between the cores, and while one actor encodes its batch
    the others compute (docs/PERFORMANCE.md). `--actors` fixes the pool; each then gets an equal share of the cores.
    A job known to hold only `batches` batches gets one CPU actor per BATCHES_PER_ACTOR of them: each actor costs
    seconds of start-up (a process, torch, the model) on cores the first actor needs, so a small job is done sooner
    by one actor than by two (docs/PERFORMANCE.md).
    """
    res = ray.cluster_resources()
    gpus, cpus = int(res.get("GPU", 0)), max(1, int(res.get("CPU", 1)))
    use_gpu = cfg.device == "cuda" or (cfg.device == "auto" and gpus > 0)
    if use_gpu:
        pool = actor_range(cfg.actors) if cfg.actors else (1, max(1, gpus))
        if gpus == 0:
            log.info("the predictor pool waits for its first GPU: none is up now; it asks for 1 GPU per actor, %d to %d "
                     "actors, for an autoscaler to add", *pool)
        # as many CPUs as asked, but never so many that an actor fits on none of the GPU nodes up now, nor leaves no
        # room there for the read stage (on a 4-CPU, 1-GPU machine: 3)
        per_gpu = [n["Resources"].get("CPU", 0) / n["Resources"]["GPU"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU")]
        cpus_each = max(1, min(cfg.cpus_per_gpu, int(min(per_gpu) - READ_CPUS))) if per_gpu else cfg.cpus_per_gpu
        return pool, {"num_gpus": 1, "num_cpus": cpus_each}, 1
    fixed = actor_range(cfg.actors) if cfg.actors else None
    threads = cfg.threads or (max(1, cpus // fixed[1]) if fixed else 1)
    wanted = -(-batches // BATCHES_PER_ACTOR) if batches else cpus
    pool = fixed or (max(1, min(cpus // threads, wanted)),) * 2
    return pool, {"num_cpus": round(CPU_ACTOR_SHARE * min(threads, cpus / pool[1]), 4)}, threads


def predictor_plan(cfg, batches: int | None = None):
    """(predict group, actor pool, ray resources per actor, torch threads) for a predictor stage: the device is where
    actor_plan placed the actors (CUDA on GPU actors, never a quiet fall back), and a GPU actor runs a call per CPU
    it reserves."""
    from rayseg.config import PredictConfig

    pool, resources, threads = actor_plan(cfg, batches)
    on_gpu = "num_gpus" in resources
    opts = dataclasses.replace(PredictConfig.of(cfg), device="cuda" if on_gpu else "cpu")
    return opts, actor_pool(pool, resources["num_cpus"] if on_gpu else 1), resources, threads


def actor_pool(pool: tuple[int, int], calls: int = 1) -> ray.data.ActorPoolStrategy:
    """The predictor pool; `calls` > 1 (GPU actors: --cpus-per-gpu) runs that many batches in each actor at once, on
    threads: one decodes or encodes while another holds the device (the predictor's lock lets one at a time)."""
    if calls > 1:
        return ray.data.ActorPoolStrategy(min_size=pool[0], max_size=pool[1], max_concurrent_calls_per_actor=calls,
                                          enable_true_multi_threading=True)
    return ray.data.ActorPoolStrategy(min_size=pool[0], max_size=pool[1])
