"""The nightly commit protocol: fenced, idempotent Delta commits of waves, each naming its manifest part.

Every commit carries the lease generation and the wave as the table's application transaction (APP_ID), is made
against the table version its run's decisions were read at, and is retried on storage errors only after reading
the table shows it did not land. A run that took the lease over commits a fence first (`fence`), so a run that lost
the lease can commit nothing after it. Each finished run marks its last commit with its night (`mark_complete`).
"""

from __future__ import annotations

import logging
import time

import pyarrow as pa
import pyarrow.parquet as pq

from rayseg import storage
from rayseg.table import APP_ID, MANIFEST_SCHEMA, NIGHT_KEY, NIGHTLY_SCHEMA, PART_KEY, PARTS_DIR, State, _manifest_url, open_table, sink

log = logging.getLogger("rayseg")


# The table's application transaction (APP_ID) carries the lease generation and the wave: generation << 20 | wave.
# A takeover's fence is wave 0. Tables written before waves were numbered carry the bare generation (< 2**20), which
# reads as generation 0 and so never outranks a lease.
WAVE_BITS = 20
COMMIT_ATTEMPTS = 4  # a commit that fails for a storage error is retried this many times in all, with backoff


def txn_version(generation: int, wave: int) -> int:
    return generation << WAVE_BITS | wave


def generation_of(txn: int | None) -> int:
    return (txn or 0) >> WAVE_BITS


def fence(output: str, storage_options: dict | None, generation: int, run_id: str) -> None:
    """A run that took the lease commits this first, before it reads any state: an empty commit with its generation.

    A run that lost the lease and still believes it holds it (stalled past expiry, then resumed) made its decisions
    on a table version older than the fence, so its next commit conflicts with the fence in Delta's own check and is
    refused (commit: LeaseLost), instead of adding rows the new holder is also about to write.
    """
    dt = open_table(output, storage_options, create=True)
    _commit_once(dt, [], {"rayseg.fence": run_id, "rayseg.run_id": run_id}, generation, 0, run_id)


def commit(state: State, output: str, storage_options: dict | None, adds: list, removes: list[str], part_rows: list[dict],
           part_name: str, generation: int, run_id: str, data_change: bool = True) -> int:
    """One atomic commit: add files, remove files, and name the manifest part written just before it.

    The commit is made against the table version this run's decisions were read at (state.table is not refreshed
    first), so Delta refuses it if any other commit landed since: after a takeover's fence that is a LeaseLost. Each
    wave has its own transaction version, so an unclear failure (a lost reply) is settled by reading the table: the
    wave landed, or it is retried, up to COMMIT_ATTEMPTS times for storage errors. `data_change` is off for a
    commit that only rewrites rows (compaction).
    """
    from deltalake.transaction import RemoveAction

    fs, path = sink(_manifest_url(output, PARTS_DIR, part_name), storage_options)
    storage.retry(pq.write_table, pa.Table.from_pylist(part_rows, schema=MANIFEST_SCHEMA), path, filesystem=fs,
                  what="writing a manifest part")
    now_ms = int(time.time() * 1000)
    actions = adds + [RemoveAction(path=r, data_change=data_change, deletion_timestamp=now_ms) for r in removes]
    _commit_wave(state, actions, {PART_KEY: part_name, "rayseg.run_id": run_id}, generation, run_id)
    for r in part_rows:
        state.records[r["shard_url"]] = r
    state.parts.append(part_name)
    return state.version


def _commit_wave(state: State, actions: list, metadata: dict, generation: int, run_id: str) -> int:
    """The run's next transaction (generation, wave) on state's table; the state's version after it."""
    state.waves += 1
    _commit_once(state.table, actions, metadata, generation, state.waves, run_id)
    state.version = state.table.version()
    return state.version


def _commit_once(dt, actions: list, metadata: dict, generation: int, wave: int, run_id: str) -> None:
    """Commit `actions` as transaction (generation, wave) exactly once, or raise (LeaseLost, or the last error)."""
    from deltalake.transaction import CommitProperties, Transaction

    from rayseg.lease import LeaseLost

    txn = txn_version(generation, wave)
    props = CommitProperties(custom_metadata=metadata, app_transactions=[Transaction(APP_ID, txn)])
    for attempt in range(COMMIT_ATTEMPTS):
        try:
            dt.create_write_transaction(actions, "append", NIGHTLY_SCHEMA, commit_properties=props)
            break
        except Exception as e:  # noqa: BLE001 - settled by what the table holds now
            error = e
        storage.retry(dt.update_incremental, what="reading the table after a failed commit")
        landed = dt.transaction_version(APP_ID)
        if landed == txn:
            log.info("commit %d of run %s had landed although its reply was lost (%s)", wave, run_id, error)
            break
        if generation_of(landed) > generation or "concurrent" in str(error).lower():
            raise LeaseLost(f"run {run_id} lost its lease: another run (lease generation {generation_of(landed)}) took the "
                            f"output over and committed since this run read it; nothing more of this run is committed") from None
        if attempt == COMMIT_ATTEMPTS - 1:
            raise error
        log.warning("commit %d of run %s failed (%s); retrying", wave, run_id, str(error).splitlines()[0] if str(error) else type(error).__name__)
        time.sleep(min(8.0, 0.5 * 2**attempt))
    dt.update_incremental()


def mark_complete(state: State, output: str, generation: int, run_id: str, night: str) -> int:
    """A finished run's last commit: empty, with the night's date in its metadata (`night_version` finds it)."""
    return _commit_wave(state, [], {NIGHT_KEY: night, "rayseg.run_id": run_id}, generation, run_id)
