"""rayseg.storage: finding shards behind folders, globs and URLs; retries; secret-free logging; JSON writes."""

from __future__ import annotations

import errno
import json
import uuid

import fsspec
import pytest

from rayseg import storage
from rayseg.errors import UserError
from rayseg.storage import discover, is_transient, join, redact, redact_url


def touch(fs, path: str, data: bytes = b"x") -> None:
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path, "wb") as f:
        f.write(data)


@pytest.fixture
def memroot():
    """A fresh folder on fsspec's in-memory filesystem, removed afterwards."""
    fs = fsspec.filesystem("memory")
    root = f"/rayseg-test-{uuid.uuid4().hex[:8]}"
    yield fs, root
    if fs.exists(root):
        fs.rm(root, recursive=True)


SHARD_FILES = {"a.png": "image", "b.JPG": "image", "sub/c.tar": "tar", "sub/deeper/d.h5": "h5", "e.hdf5": "h5",
               "f.parquet": "parquet", "g.tiff": "image"}


def test_discover_local_folder_finds_every_kind_recursively(tmp_path):
    for name in [*SHARD_FILES, "notes.txt", "sub/README"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"12345")
    shards, ignored = discover([str(tmp_path)])
    assert {s.url: s.kind for s in shards} == {f"file://{tmp_path}/{n}": k for n, k in SHARD_FILES.items()}
    assert [s.url for s in shards] == sorted(s.url for s in shards)
    assert all(s.size == 5 and s.version for s in shards)
    assert sorted(ignored) == [f"file://{tmp_path}/notes.txt", f"file://{tmp_path}/sub/README"]


def test_discover_file_url_and_plain_path_give_the_same_shards(tmp_path):
    (tmp_path / "a.png").write_bytes(b"x")
    (tmp_path / "b.tar").write_bytes(b"x")
    assert discover([f"file://{tmp_path}"])[0] == discover([str(tmp_path)])[0]


def test_discover_memory_folder_and_glob(memroot):
    fs, root = memroot
    for name in ["x/1.png", "x/2.png", "x/3.tar", "x/skip.json", "y/4.png"]:
        touch(fs, f"{root}/{name}")
    shards, ignored = discover([f"memory://{root}/x"])
    assert [(s.url, s.kind) for s in shards] == [(f"memory://{root}/x/1.png", "image"), (f"memory://{root}/x/2.png", "image"),
                                                 (f"memory://{root}/x/3.tar", "tar")]
    assert ignored == [f"memory://{root}/x/skip.json"]
    shards, ignored = discover([f"memory://{root}/*/*.png"])
    assert [s.url for s in shards] == [f"memory://{root}/x/1.png", f"memory://{root}/x/2.png", f"memory://{root}/y/4.png"]
    assert ignored == []


def test_a_glob_catching_other_kinds_ignores_them(memroot):
    fs, root = memroot
    touch(fs, f"{root}/a.png")
    touch(fs, f"{root}/a.json")
    shards, ignored = discover([f"memory://{root}/a.*"])
    assert [s.url for s in shards] == [f"memory://{root}/a.png"]
    assert ignored == [f"memory://{root}/a.json"]


def test_the_same_shard_named_twice_is_read_once(tmp_path):
    (tmp_path / "a.png").write_bytes(b"x")
    shards, _ = discover([str(tmp_path), str(tmp_path / "a.png"), f"{tmp_path}/*.png"])
    assert len(shards) == 1


@pytest.mark.parametrize("make,inp,message", [
    (lambda p: None, "{p}/nothing-here", "does not exist"),
    (lambda p: None, "{p}/*.png", "matches no files"),
    (lambda p: (p / "empty").mkdir(), "{p}/empty", "holds no files"),
    (lambda p: (p / "notes.txt").write_text("x"), "{p}/notes.txt", "is not a supported shard"),
    (lambda p: (p / "notes.txt").write_text("x"), "{p}", "no images or shards found"),
])
def test_discover_refuses_inputs_with_nothing_to_read(tmp_path, make, inp, message):
    make(tmp_path)
    with pytest.raises(UserError, match=message):
        discover([inp.format(p=tmp_path)])


def test_unknown_protocol_is_a_user_error():
    with pytest.raises(UserError, match="cannot open nosuchproto://bucket/x"):
        storage.filesystem("nosuchproto://bucket/x")


@pytest.mark.parametrize("path,kind", [("a.png", "image"), ("A.JPEG", "image"), ("x/y.webp", "image"), ("s.tar", "tar"),
                                       ("s.H5", "h5"), ("s.hdf5", "h5"), ("s.parquet", "parquet"), ("s.tar.gz", None),
                                       ("s.txt", None), ("png", None)])
def test_kind_of(path, kind):
    assert storage.kind_of(path) == kind


@pytest.mark.parametrize("error,transient", [
    (FileNotFoundError("s3://b/k"), False),
    (PermissionError("Access Denied"), False),
    (IsADirectoryError("x"), False),
    (UserError("connection string timeout is wrong"), False),  # the user's mistake, whatever its words
    (ValueError("not a tar file"), False),
    (KeyError("images"), False),
    (ConnectionResetError("reset by peer"), True),
    (ConnectionRefusedError(), True),
    (TimeoutError(), True),
    (OSError(errno.ETIMEDOUT, "Connection timed out"), True),
    (OSError(errno.EBUSY, "busy"), True),
    (OSError(errno.ENOSPC, "No space left on device"), False),
    (OSError("An error occurred (SlowDown) when calling the GetObject operation: Please reduce your request rate."), True),
    (RuntimeError("503 Service Unavailable"), True),
    (RuntimeError("Server disconnected"), True),
])
def test_is_transient(error, transient):
    assert is_transient(error) is transient


def test_retry_tries_again_after_transient_errors_only(monkeypatch):
    sleeps = []
    monkeypatch.setattr(storage.time, "sleep", sleeps.append)
    calls = []

    def flaky(x):
        calls.append(x)
        if len(calls) < storage.RETRY_ATTEMPTS:
            raise ConnectionResetError("reset by peer")
        return x * 2

    assert storage.retry(flaky, 21) == 42
    assert len(calls) == storage.RETRY_ATTEMPTS and len(sleeps) == storage.RETRY_ATTEMPTS - 1
    assert all(0 < s <= storage.RETRY_MAX_S for s in sleeps)

    calls.clear()

    def missing():
        calls.append(1)
        raise FileNotFoundError("gone")

    with pytest.raises(FileNotFoundError):
        storage.retry(missing)
    assert len(calls) == 1


def test_retry_gives_up_after_its_attempts(monkeypatch):
    monkeypatch.setattr(storage.time, "sleep", lambda s: None)
    calls = []

    def down():
        calls.append(1)
        raise TimeoutError("timed out")

    with pytest.raises(TimeoutError):
        storage.retry(down, attempts=4)
    assert len(calls) == 4


@pytest.mark.parametrize("parts,url", [
    (("s3://bucket/out", "images", "a.parquet"), "s3://bucket/out/images/a.parquet"),
    (("s3://bucket/out/", "/images/", "/a.parquet"), "s3://bucket/out/images/a.parquet"),
    (("/data/out",), "/data/out"),
    (("memory://x", "_SUCCESS.json"), "memory://x/_SUCCESS.json"),
])
def test_join(parts, url):
    assert join(*parts) == url


@pytest.mark.parametrize("url,shown", [
    ("ftp://alice:hunter2@files.example.com/data/a.tar", "ftp://***@files.example.com/data/a.tar"),
    ("abfs://container@account.dfs.core.windows.net/x", "abfs://***@account.dfs.core.windows.net/x"),
    ("s3://bucket/folder@2024/a.png", "s3://bucket/folder@2024/a.png"),  # an @ in the path is no credential
    ("/local/path@x/a.png", "/local/path@x/a.png"),
])
def test_redact_url(url, shown):
    assert redact_url(url) == shown
    assert "hunter2" not in redact_url(url)


def test_redact_hides_every_credential_and_keeps_the_rest():
    opts = {"key": "AKIAEXAMPLE", "secret": "SECRET-1", "token": "SECRET-2", "endpoint_url": "http://127.0.0.1:9000",
            "anon": False, "account_name": "acct", "sas_token": "SECRET-3", "password": "SECRET-4",
            "client_kwargs": {"region_name": "eu-west-1", "aws_secret_access_key": "SECRET-5", "aws_session_token": "SECRET-6"},
            "gcs": {"project": "proj", "private_key": "SECRET-7"}}
    out = redact(opts)
    text = json.dumps(out)
    assert "AKIAEXAMPLE" not in text and "SECRET-" not in text, text
    assert out["endpoint_url"] == "http://127.0.0.1:9000" and out["anon"] is False and out["account_name"] == "acct"
    assert out["client_kwargs"]["region_name"] == "eu-west-1" and out["gcs"]["project"] == "proj"
    assert opts["key"] == "AKIAEXAMPLE", "the caller's options are left as they were"


@pytest.mark.parametrize("where", ["file", "memory"])
def test_write_json_round_trip_and_replace(tmp_path, memroot, where):
    fs, root = memroot
    url = f"{tmp_path}/new/dir/summary.json" if where == "file" else f"memory://{root}/new/dir/summary.json"
    storage.write_json(url, {"rows": 3, "b": [1, 2]})
    assert storage.read_json(url) == {"rows": 3, "b": [1, 2]}
    storage.write_json(url, {"rows": 4})
    assert storage.read_json(url) == {"rows": 4}
    folder_fs, folder = storage.filesystem(url.rsplit("/", 1)[0])
    assert [p.rsplit("/", 1)[1] for p in folder_fs.ls(folder, detail=False)] == ["summary.json"], "no temporary file left"


def test_write_json_failure_leaves_the_old_file(tmp_path):
    url = str(tmp_path / "summary.json")
    storage.write_json(url, {"rows": 1})
    with pytest.raises(TypeError):
        storage.write_json(url, {"rows": object.__new__(type("Unserialisable", (), {"__str__": None}))})
    assert storage.read_json(url) == {"rows": 1}


def test_is_nonempty_and_remove(memroot):
    fs, root = memroot
    url = f"memory://{root}/out"
    assert not storage.is_nonempty(url)
    touch(fs, f"{root}/out/part-0.parquet")
    assert storage.is_nonempty(url)
    storage.remove(url)
    assert not storage.is_nonempty(url) and not fs.exists(f"{root}/out")
    storage.remove(url)  # removing what is not there is fine
