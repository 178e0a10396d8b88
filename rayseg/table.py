"""The nightly output as a Delta Lake table, its manifest of committed shards, and `read_table`, the one way to
read any rayseg output.

    import duckdb, rayseg
    images = rayseg.read_table("s3://masks/nightly", storage_options={...})   # a pyarrow Dataset: one snapshot
    duckdb.sql("SELECT count(*), count(error) FROM images")

OUT/images/ of a nightly output is a Delta table: its log (`_delta_log/`) says which Parquet files make up each
version, and each wave of a run is one atomic commit that adds the wave's files (written by workers) and removes the files that held
earlier rows of the same shards. A reader that goes through the log (read_table, or any Delta reader: DuckDB's
delta extension, Spark, Polars, deltalake) sees every committed image once; globbing OUT/images/**/*.parquet
does not (it also sees uncommitted files of a running wave and files replaced but not yet vacuumed).

The manifest says which shards are committed, under which key (model digest + output options) and in which
files (a shard's rows can be spread over several files, and a file can hold rows of several shards). Each wave writes its manifest rows to OUT/_manifest/parts/ before its commit and names that part in the
commit's metadata, so a part counts only once its data is committed: a kill at any moment leaves the two in
step. Runs fold the parts into one snapshot file (OUT/_manifest/snapshot-<table version>.parquet, named by
OUT/_manifest/_snapshot.json), so reading the state costs one file plus the commits since the last run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import posixpath
import time

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from rayseg import layout, storage
from rayseg.objects import OBJECTS_TYPE
from rayseg.stats import REGION_FIELDS, SCHEMA

log = logging.getLogger("rayseg")

# objects: null unless --objects; the region columns: null but on huge images' rows (tables made before them gain
# them on the next run: open_table)
NIGHTLY_SCHEMA = pa.schema([*SCHEMA, pa.field("objects", OBJECTS_TYPE), *(pa.field(n, t) for n, t in REGION_FIELDS)])
MASKS_DIR = "masks"  # OUT/masks/RUN_ID/NAME-HASH.zarr: huge images' mask stores (rayseg.maskstore.store_url)
MANIFEST_DIR, PARTS_DIR, POINTER = "_manifest", "parts", "_snapshot.json"
MANIFEST_SCHEMA = pa.schema([("shard_url", pa.string()), ("size", pa.int64()), ("version", pa.string()), ("key", pa.string()),
                             ("files", pa.list_(pa.string())), ("rows", pa.int64()), ("errors", pa.int64()), ("run_id", pa.string()),
                             ("committed_at", pa.string())])
APP_ID = "rayseg-nightly"  # the application transaction id carrying the lease generation
PART_KEY = "rayseg.manifest_part"
# Files replaced by a commit stay this long (nightly's --keep-hours) for readers still holding an older snapshot, then
# `vacuum` deletes them. This is the time-travel window: `read_table(OUT, night=...)` reads a night up to this old.
VACUUM_HOURS = 168
NIGHT_KEY = "rayseg.night_complete"  # commit metadata of the last commit of a nightly run that finished: its date
# Table properties of a new table, for a year of nights: a checkpoint every 100 commits (a reader replays at most
# 99 commit files), commit files older than 30 days deleted at checkpoints (the log stays bounded), and replaced
# files kept as long as `vacuum` keeps them.
TABLE_PROPERTIES = {
    "delta.checkpointInterval": "100",
    "delta.enableExpiredLogCleanup": "true",
    "delta.logRetentionDuration": "interval 30 days",
    "delta.deletedFileRetentionDuration": f"interval {VACUUM_HOURS} hours",
}


# ---- where the table is, for delta-rs --------------------------------------------------------------------


def delta_location(url: str, storage_options: dict | None) -> tuple[str, dict]:
    """(table URI, delta-rs storage options) for an fsspec URL and its fsspec storage options."""
    fs, path = storage.filesystem(url, storage_options)
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    if "file" in protocols:
        return os.path.abspath(path), {}
    so = storage_options or {}
    if {"s3", "s3a"} & set(protocols):
        opts = {"AWS_REGION": (so.get("client_kwargs") or {}).get("region_name") or os.environ.get("AWS_REGION") or "us-east-1"}
        for ours, theirs in (("key", "AWS_ACCESS_KEY_ID"), ("secret", "AWS_SECRET_ACCESS_KEY"), ("token", "AWS_SESSION_TOKEN")):
            if so.get(ours):
                opts[theirs] = so[ours]
        endpoint = so.get("endpoint_url") or (so.get("client_kwargs") or {}).get("endpoint_url")
        if endpoint:
            opts["AWS_ENDPOINT_URL"] = endpoint
            opts["AWS_ALLOW_HTTP"] = str(endpoint.startswith("http://")).lower()
        return f"s3://{path}", opts
    return fs.unstrip_protocol(path), {}  # gs://, az://, ...: delta-rs takes credentials from the environment


def is_table(output: str, storage_options: dict | None) -> bool:
    fs, path = storage.filesystem(storage.join(output, layout.IMAGES_DIR, "_delta_log"), storage_options)
    fs.invalidate_cache(path)
    return fs.exists(path)


def open_table(output: str, storage_options: dict | None, create: bool = False):
    """The images table of OUT (None if there is none and `create` is off)."""
    from deltalake import DeltaTable

    uri, opts = delta_location(storage.join(output, layout.IMAGES_DIR), storage_options)
    if not is_table(output, storage_options):
        if not create:
            return None
        DeltaTable.create(uri, NIGHTLY_SCHEMA, mode="ignore", storage_options=opts, name="rayseg images",
                          configuration=TABLE_PROPERTIES)
    dt = DeltaTable(uri, storage_options=opts)
    if create:
        add_missing_columns(dt, uri, opts)
    return dt


def add_missing_columns(dt, uri: str, opts: dict | None) -> None:
    """A table made by an older rayseg gains the columns and object fields NIGHTLY_SCHEMA has since added (nullable;
    its old files read them as null), by a schema merge that adds no file. Called by a run holding the lease, before
    its fence: a commit whose files carry a column the table's schema lacks would be read without it."""
    from deltalake import write_deltalake

    have = _paths(pa.schema(dt.schema().to_arrow()))
    missing = sorted(_paths(NIGHTLY_SCHEMA) - have)
    if missing:
        write_deltalake(uri, NIGHTLY_SCHEMA.empty_table(), mode="append", schema_mode="merge", storage_options=opts)
        dt.update_incremental()
        log.info("the images table gained %s", ", ".join(missing))


def _paths(schema: pa.Schema) -> set[str]:
    """Every field's dotted path, into structs and list elements (a list's element field is named differently by
    pyarrow and Delta, so names, not types, are compared)."""
    out: set[str] = set()

    def walk(prefix: str, typ) -> None:
        while pa.types.is_list(typ) or pa.types.is_large_list(typ):
            typ = typ.value_type
        if pa.types.is_struct(typ):
            for f in typ:
                out.add(f"{prefix}.{f.name}")
                walk(f"{prefix}.{f.name}", f.type)

    for f in schema:
        out.add(f.name)
        walk(f.name, f.type)
    return out


def read_table(output: str, storage_options: dict | None = None, table: str = "images", night: str | None = None) -> pads.Dataset:
    """OUT's rows as one consistent snapshot: `table` is "images" (one row per image) or "objects" (one per object).

    A nightly output is read through its Delta log; a `rayseg segment` output is a plain Parquet folder. `night`
    ("YYYY-MM-DD", or "last") reads a nightly output as the last nightly run that finished on or before that date
    (UTC) left it, not a run still writing or one that was killed: see `night_version`.
    """
    if table not in (layout.IMAGES_DIR, layout.OBJECTS_DIR):
        raise ValueError(f"table must be {layout.IMAGES_DIR!r} or {layout.OBJECTS_DIR!r}")
    if night is not None and not is_table(output, storage_options):
        raise ValueError(f"{output} is not a nightly output: only a nightly output has nights")
    if not is_table(output, storage_options):
        fs, path = storage.pyarrow_filesystem(storage.join(output, table), storage_options)
        ds = pads.dataset(path, filesystem=fs, format="parquet")
        if not is_table(output, storage_options):  # looked again: a nightly run may have created its table since
            return ds
    dt = open_table(output, storage_options)
    if night is not None:
        dt.load_as_version(night_version(output, storage_options, dt.version(), night))
    ds = dt.to_pyarrow_dataset()
    if table == layout.OBJECTS_DIR:  # objects are committed inside their image rows, so both tables are one snapshot
        from rayseg.objects import explode

        rows = ds.to_table(columns=["image_id", "objects"], filter=pads.field("objects").is_valid())
        return pads.dataset(explode(rows))
    return ds


def night_version(output: str, storage_options: dict | None, newest: int, night: str) -> int:
    """The table version the last run that finished on or before `night` (a UTC date, or "last") committed last.

    Every nightly run that finishes marks its last commit (`mark_complete`), so a reader can tell a finished night
    from a run still writing. Commits older than the log's retention (30 days) are no longer listed.

    The commit files are read themselves, from version `newest` down, a batch at a time (one small object each,
    fetched concurrently): DeltaTable.history lists and parses the whole log, and on some S3 servers it does not
    return.
    """
    for entry in _commits_newest_first(output, storage_options, newest):
        done = entry.get(NIGHT_KEY)
        if done and (night == "last" or done <= night):
            return int(entry["version"])
    raise ValueError(f"no nightly run had finished by {night} (or its commits are older than the log keeps)")


def _commits_newest_first(output: str, storage_options: dict | None, newest: int, batch: int = 32):
    """Each commit's commitInfo (with its "version"), from version `newest` down to the oldest the log still keeps."""
    fs, log_dir = storage.filesystem(storage.join(output, layout.IMAGES_DIR, "_delta_log"), storage_options)
    for top in range(newest, -1, -batch):
        paths = [posixpath.join(log_dir, f"{v:020d}.json") for v in range(top, max(-1, top - batch), -1)]
        bodies = fs.cat(paths, on_error="return")
        for version, path in zip(range(top, -1, -1), paths):
            body = bodies.get(path)
            if not isinstance(body, bytes):  # cleaned up: older commits are gone too
                return
            info = next((json.loads(line)["commitInfo"] for line in body.decode().splitlines()
                         if line.strip() and "commitInfo" in json.loads(line)), {})
            yield {**info, "version": version}


# ---- the manifest ------------------------------------------------------------------------------------------


@dataclasses.dataclass
class State:
    """Committed shards as of table version `version`: shard URL -> manifest row."""

    records: dict[str, dict]
    version: int = -1
    snapshot_version: int = -1
    table: object = None  # the DeltaTable, once there is one
    parts: list[str] = dataclasses.field(default_factory=list)  # the parts of the commits since the snapshot: a fold's to delete
    waves: int = 0  # waves this run committed on this state (each commit's transaction version: generation and wave)

    def files(self) -> dict[str, list[str]]:
        """Data file -> the shards whose rows it holds."""
        out: dict[str, list[str]] = {}
        for url, r in self.records.items():
            for rel in r["files"]:
                out.setdefault(rel, []).append(url)
        return out


def sink(url: str, storage_options: dict | None):
    """(pyarrow filesystem, path) to write a file at `url`, its folder made on disks (object stores need none)."""
    fs, path = storage.pyarrow_filesystem(url, storage_options)
    fs.create_dir(posixpath.dirname(path), recursive=True)
    return fs, path


def _manifest_url(output: str, *parts: str) -> str:
    return storage.join(output, MANIFEST_DIR, *parts)


def _read_rows(url: str, storage_options: dict | None) -> list[dict]:
    fs, path = storage.pyarrow_filesystem(url, storage_options)
    t = pq.read_table(path, filesystem=fs)
    if "files" not in t.column_names and "file" in t.column_names:  # written before a shard could span files
        one = t["file"].to_pylist()
        t = t.append_column("files", pa.array([[f] if f else [] for f in one], pa.list_(pa.string())))
    return t.select(MANIFEST_SCHEMA.names).cast(MANIFEST_SCHEMA).to_pylist()


READ_ATTEMPTS = 5  # a fold between reading the pointer and reading what it names: read the new pointer, this many times


def read_state(output: str, storage_options: dict | None) -> State:
    """The committed shards: the last snapshot, then the manifest parts of every commit after it.

    A run folding the manifest meanwhile (`compact_manifest`: new snapshot, then the pointer, then the old files
    deleted) can delete what an older pointer names between the two reads; the state is then read again from the new
    pointer, which names files that exist. Readers hold no lease (`--status`, a run waiting for one).
    """
    dt = open_table(output, storage_options)
    if dt is None:
        return State({})
    for attempt in range(READ_ATTEMPTS):
        try:
            return _read_state_once(output, storage_options, dt)
        except FileNotFoundError:
            if attempt == READ_ATTEMPTS - 1:
                raise
            log.debug("the manifest was folded while it was read; reading it again", exc_info=True)
            storage.filesystem(_manifest_url(output), storage_options)[0].invalidate_cache()
            time.sleep(0.1 * (attempt + 1))
            dt.update_incremental()
    raise AssertionError("unreachable")


def _read_state_once(output: str, storage_options: dict | None, dt) -> State:
    try:
        pointer = storage.read_json(_manifest_url(output, POINTER), storage_options)
    except FileNotFoundError:
        pointer = {"version": -1, "file": None}
    records = {}
    if pointer["file"]:
        records = {r["shard_url"]: r for r in _read_rows(_manifest_url(output, pointer["file"]), storage_options)}
    current = dt.version()
    parts = _parts_since(output, storage_options, pointer["version"], current)
    for part in parts:
        for r in _read_rows(_manifest_url(output, PARTS_DIR, part), storage_options):
            records[r["shard_url"]] = r
    return State(records, current, pointer["version"], dt, parts)


def _parts_since(output: str, storage_options: dict | None, after: int, upto: int) -> list[str]:
    """Manifest parts named by the commits after version `after`, oldest first.

    Read from the commit files themselves (one small object each) rather than DeltaTable.history, which holds
    Python's GIL while it waits on storage.
    """
    if upto <= after:
        return []
    fs, log_dir = storage.filesystem(storage.join(output, layout.IMAGES_DIR, "_delta_log"), storage_options)
    paths = [posixpath.join(log_dir, f"{v:020d}.json") for v in range(after + 1, upto + 1)]
    bodies = fs.cat(paths)  # concurrent on object stores
    parts = []
    for path in paths:
        for line in bodies[path].decode().splitlines():
            info = json.loads(line).get("commitInfo") if line.strip() else None
            if info and info.get(PART_KEY):
                parts.append(info[PART_KEY])
    return parts


ORPHAN_PART_S = 24 * 3600  # a part of this run that no commit names is deleted once this old


def compact_manifest(output: str, storage_options: dict | None, state: State, run_id: str | None = None) -> bool:
    """Fold the parts into a new snapshot at the state's table version; drop older snapshots and the folded parts.

    Called by the lease holder `run_id` after its fence (`fence`), no other run can commit any more, so a part of
    another run that no commit named (a killed or fenced-out run's last wave) is dropped too. Without `run_id`, or
    for parts of this run, a part this state has not folded stays for the next fold; any part no commit named is
    dropped once a day old.
    """
    if state.version == state.snapshot_version or state.version < 0 or not state.records:
        return False
    name = f"snapshot-{state.version:020d}.parquet"
    fs, path = sink(_manifest_url(output, name), storage_options)
    rows = sorted(state.records.values(), key=lambda r: r["shard_url"])
    pq.write_table(pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA), path, filesystem=fs)
    storage.write_json(_manifest_url(output, POINTER), {"version": state.version, "file": name}, storage_options)
    state.snapshot_version = state.version
    folded, state.parts = set(state.parts), []
    ffs, root = storage.filesystem(_manifest_url(output), storage_options)
    ffs.invalidate_cache(root)
    stale = []
    for p, info in ffs.find(root, detail=True).items():
        base = posixpath.basename(p)
        if base in (name, POINTER) or base.startswith("."):
            continue
        fenced_out = run_id is not None and not base.startswith(f"{run_id}-")
        if posixpath.basename(posixpath.dirname(p)) != PARTS_DIR or base in folded or fenced_out or _age_s(info) > ORPHAN_PART_S:
            stale.append(p)  # an older snapshot, a folded part, another run's unfolded part, an old orphan
    if stale:
        ffs.rm(stale)
    return True


def _age_s(info: dict) -> float:
    """Seconds since a file (an fsspec info dict) was last written; 0 where the store does not say."""
    mtime = info.get("mtime") or info.get("LastModified") or info.get("last_modified") or info.get("updated")
    if mtime is None:
        return 0.0
    if hasattr(mtime, "timestamp"):
        mtime = mtime.timestamp()
    elif isinstance(mtime, str):
        import datetime

        mtime = datetime.datetime.fromisoformat(mtime.replace("Z", "+00:00")).timestamp()
    return time.time() - float(mtime)


# ---- a wave's commit ---------------------------------------------------------------------------------------


def write_file(table: pa.Table, url: str, storage_options: dict | None) -> int:
    """Write one data file; returns its size in bytes."""
    fs, path = sink(url, storage_options)
    pq.write_table(table, path, filesystem=fs, row_group_size=8192)
    return fs.get_file_info(path).size


class FileStats:
    """Delta file statistics of the columns readers filter on (row count, min, max, nulls), built as rows are written."""

    COLUMNS = ("image_id", "shard")

    def __init__(self):
        self.rows, self.min, self.max, self.nulls = 0, {}, {}, dict.fromkeys(self.COLUMNS, 0)

    def update(self, t: pa.Table) -> FileStats:
        import pyarrow.compute as pc

        self.rows += t.num_rows
        for col in self.COLUMNS:
            self.nulls[col] += t[col].null_count
            mm = pc.min_max(t[col])
            lo, hi = mm["min"].as_py(), mm["max"].as_py()
            if lo is not None:
                self.min[col] = min(lo, self.min.get(col, lo))
                self.max[col] = max(hi, self.max.get(col, hi))
        return self

    def json(self) -> str:
        return json.dumps({"numRecords": self.rows, "minValues": self.min, "maxValues": self.max, "nullCount": self.nulls})


def add_action(rel: str, size: int, stats: FileStats | str, data_change: bool = True):
    """A Delta add of data file `rel` (relative to the table); `stats` as FileStats or its json. `data_change` is off
    for a file that only rewrites rows already in the table (compaction), so change readers skip it."""
    from deltalake.transaction import AddAction

    return AddAction(rel, size, {}, int(time.time() * 1000), data_change, stats if isinstance(stats, str) else stats.json())


def file_sizes(state: State) -> dict[str, int]:
    """Each data file of the table at state's version (relative path -> bytes)."""
    adds = pa.table(state.table.get_add_actions())
    return dict(zip(adds["path"].to_pylist(), adds["size_bytes"].to_pylist()))


def keep_rows(output: str, storage_options: dict | None, rel: str, keep: list[str]) -> pa.Table:
    """The rows of data file `rel` whose shard is in `keep` (what stays when its other shards are redone)."""
    import pyarrow.compute as pc

    fs, path = storage.pyarrow_filesystem(storage.join(output, layout.IMAGES_DIR, rel), storage_options)
    t = pq.read_table(path, filesystem=fs, schema=NIGHTLY_SCHEMA)
    return t.filter(pc.is_in(t["shard"], pa.array(keep, pa.string())))


def vacuum(state: State, keep_hours: int = VACUUM_HOURS, full: bool = False, output: str | None = None,
           storage_options: dict | None = None) -> int:
    """Delete files that commits replaced more than `keep_hours` ago; returns how many. Given OUT (`output`), also
    the huge images' mask stores that only those files named (delete_unreferenced_stores).

    Without `full` only the log's own record of replaced files is read, so the cost follows what was replaced in the
    time-travel window, not the table's history. `full` also lists every file under the table for files no commit
    names: the waves of a run that died or was fenced out before its commit. nightly asks for it after a run that did
    not end whole (`last_run_ended_whole`), the only runs that leave such files.
    """
    if state.table is None:
        return 0
    args = {"retention_hours": keep_hours, "enforce_retention_duration": False, "full": full}
    masks = storage.join(output, MASKS_DIR) if output is not None else None
    has_masks = masks is not None and storage.is_nonempty(masks, storage_options)  # huge images' stores (nightly)
    doomed = state.table.vacuum(dry_run=True, **args) if has_masks else []
    stores = _mask_urls(output, storage_options, doomed)  # read before their files go
    removed = state.table.vacuum(dry_run=False, **args)
    if has_masks and (stores or full):
        gone = delete_unreferenced_stores(output, storage_options, stores, full)
        if gone:
            log.info("deleted %d mask store(s) no data file names any more", gone)
    return len(removed)


def _store_key(url: str) -> str:
    """RUN_ID/NAME.zarr of a store under OUT/masks/, whatever the URL's spelling."""
    return "/".join(str(url).rstrip("/").split("/")[-2:])


def _mask_urls(output: str, storage_options: dict | None, rels) -> set[str]:
    """The mask stores (keys: _store_key) the rows of data files `rels` (relative to the table) name."""
    out: set[str] = set()
    for rel in rels:
        if not str(rel).endswith(".parquet"):
            continue
        fs, path = storage.pyarrow_filesystem(storage.join(output, layout.IMAGES_DIR, rel), storage_options)
        try:
            urls = pq.read_table(path, filesystem=fs, columns=["mask_url"], schema=NIGHTLY_SCHEMA).column("mask_url")
        except FileNotFoundError:  # already gone: a log's remove can name a file the run deleted itself
            continue
        out.update(_store_key(u) for u in urls.drop_null().to_pylist())
    return out


def delete_unreferenced_stores(output: str, storage_options: dict | None, candidates: set[str], full: bool) -> int:
    """Delete huge images' mask stores that no data file left in the table names: the stores of rows a vacuum just
    removed (`candidates`) and, with `full`, every store under OUT/masks/ (a killed run's, never committed). A store
    named by any data file still on disk (the current rows, or rows an older snapshot within --keep-hours still
    reads) is kept. Returns how many were deleted."""
    fs, images = storage.filesystem(storage.join(output, layout.IMAGES_DIR), storage_options)
    files = [p for p in fs.find(images) if p.endswith(".parquet") and "/_delta_log/" not in p]
    referenced = _mask_urls(output, storage_options, [p[len(images.rstrip("/")) + 1:] for p in files])
    mfs, masks = storage.filesystem(storage.join(output, MASKS_DIR), storage_options)
    if full:
        candidates = set(candidates) | {_store_key(p) for p in mfs.glob(f"{masks.rstrip('/')}/*/*.zarr")}
    gone = 0
    for key in sorted(candidates - referenced):
        mfs.rm(f"{masks.rstrip('/')}/{key}", recursive=True)
        gone += 1
    return gone


def last_run_ended_whole(output: str, storage_options: dict | None, dt) -> bool:
    """Whether the table's last commit (a vacuum's own aside) is a finished run's night mark, or the table is new.

    Reads the last commit files themselves, newest first: a history call lists the whole log (and on some S3
    servers that listing does not return)."""
    fs, log = storage.filesystem(storage.join(output, layout.IMAGES_DIR, "_delta_log"), storage_options)
    for version in range(dt.version(), max(-1, dt.version() - 20), -1):  # a vacuum commits a start and an end
        info = next((a["commitInfo"] for a in map(json.loads, fs.cat_file(f"{log}/{version:020d}.json").splitlines())
                     if "commitInfo" in a), {})
        if str(info.get("operation", "")).startswith("VACUUM"):
            continue
        return bool(info.get(NIGHT_KEY)) or info.get("operation") == "CREATE TABLE"
    return False  # twenty vacuum commits in a row: list everything once
