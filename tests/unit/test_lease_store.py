"""Stores told apart: a store that does not refuse a second exclusive create is refused at start-up, in one
sentence naming it, exit 1; local disk and S3 (moto server) pass the probe and keep nothing of it."""

from __future__ import annotations

import json
import logging
import threading

import fsspec
import numpy as np
import pytest
from fsspec.implementations.local import LocalFileSystem
from moto.moto_server.threaded_moto_server import ThreadedMotoServer

from rayseg import cli, lease_store
from rayseg.lease_store import UnsafeStore, check_store
from tests.conftest import free_port, png_bytes, random_image, tar_bytes


@pytest.fixture(params=["local", "s3"])
def where(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "out"), {}
    bucket, opts = request.getfixturevalue("s3")
    return f"{bucket}/out", opts


@pytest.fixture
def shard(tmp_path) -> str:
    path = tmp_path / "in" / "a.tar"
    path.parent.mkdir()
    path.write_bytes(tar_bytes({"x.png": png_bytes(random_image(np.random.default_rng(0), 16, 16))}))
    return str(path)


def nightly(shard: str, out: str, opts: dict, *extra: str) -> list[str]:
    return ["nightly", shard, "--output", out, "--storage-options", json.dumps(opts), "--model", "pointwise",
            "--num-classes", "2", "--quiet", *extra]


def test_local_disk_and_s3_refuse_a_second_create_and_keep_no_probe(where):
    out, opts = where
    assert check_store(out, opts) in ("a local or mounted disk", f"the S3-compatible server at {opts.get('endpoint_url')}")
    fs, root = fsspec.core.url_to_fs(out, **opts)
    fs.invalidate_cache()
    assert not [p for p in fs.find(root, withdirs=False) if "/.probe-" in p]


class IgnoresConditions:
    """WSGI middleware: the server never sees If-None-Match or If-Match, as an S3-compatible server without
    conditional writes behaves (every PUT overwrites)."""

    def __init__(self, app):
        self.app = app

    def __call__(self, environ, start_response):
        environ.pop("HTTP_IF_NONE_MATCH", None)
        environ.pop("HTTP_IF_MATCH", None)
        return self.app(environ, start_response)


class UnconditionalS3Server(ThreadedMotoServer):
    """A real S3 endpoint on loopback (moto in server mode) that ignores conditional writes."""

    def _server_entry(self) -> None:
        from moto.moto_server.threaded_moto_server import MotoRequestHandler
        from moto.server import DomainDispatcherApplication, create_backend_app
        from werkzeug.serving import make_server

        self._server = make_server(self._ip_address, self._port, IgnoresConditions(DomainDispatcherApplication(create_backend_app)),
                                   True, request_handler=MotoRequestHandler)
        self._server_ready_event.set()
        self._server.serve_forever()


@pytest.fixture
def unconditional_s3():
    import s3fs

    port = free_port()
    server = UnconditionalS3Server(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    opts = {"endpoint_url": endpoint, "key": "testing-key", "secret": "testing-secret-value", "client_kwargs": {"region_name": "us-east-1"}}
    s3fs.S3FileSystem(endpoint_url=endpoint, key=opts["key"], secret=opts["secret"]).mkdir("sloppy")
    s3fs.S3FileSystem.clear_instance_cache()
    yield "s3://sloppy/out", opts
    server.stop()


def test_an_s3_server_that_ignores_conditional_writes_is_refused_in_one_sentence(unconditional_s3, shard, capsys, caplog):
    out, opts = unconditional_s3
    assert cli.main(nightly(shard, out, opts)) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.count(". ") == 0, err  # one line, one sentence
    assert err == (f"rayseg nightly: error: {out} is on the S3-compatible server at {opts['endpoint_url']}, which did not refuse "
                   "a second exclusive create of the same object, so two nightly runs could both take the lease and "
                   "overwrite each other's commits: write OUT to local disk or to S3 with conditional writes, or pass "
                   "--unsafe-single-writer if only one run can ever write it")
    fs, root = fsspec.core.url_to_fs(out, **opts)
    assert not fs.exists(f"{root}/images") and not fs.exists(f"{root}/_lease.json")  # refused before any work
    with caplog.at_level(logging.WARNING, logger="rayseg"):
        check_store(out, opts, unsafe_single_writer=True)  # the opt-in runs, and says so
    assert any("running anyway (--unsafe-single-writer)" in r.getMessage() for r in caplog.records)


class NoExclusiveCreate(LocalFileSystem):
    """A local disk mounted without exclusive create (as some FUSE mounts are): "xb" opens overwrite."""

    protocol = ("noexcl",)

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(str(path).removeprefix("noexcl://"))

    def _open(self, path, mode="rb", *args, **kwargs):
        return super()._open(path, mode.replace("x", "w"), *args, **kwargs)


def test_a_disk_without_exclusive_create_is_refused(tmp_path, shard, capsys):
    fsspec.register_implementation("noexcl", NoExclusiveCreate, clobber=True)
    out = f"noexcl://{tmp_path}/out"
    assert cli.main(nightly(shard, out, {})) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"rayseg nightly: error: {out} is on a local or mounted disk, which did not refuse a second "
                          "exclusive create of the same object, so two nightly runs could both take the lease"), err
    assert "\n" not in err


def test_a_disk_whose_flock_excludes_nothing_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(lease_store, "_flock_excludes", lambda path: False)  # as on a mount where flock is a no-op
    with pytest.raises(UnsafeStore, match="which did not refuse a second exclusive create"):
        check_store(str(tmp_path / "out"), {})


def test_a_store_without_compare_and_swap_is_refused(shard, capsys):
    out = f"memory://rayseg-{threading.get_ident()}/out"
    assert cli.main(nightly(shard, out, {})) == 1
    assert capsys.readouterr().err.strip() == (
        f"rayseg nightly: error: {out} is on memory:// (fsspec), where rayseg has no compare-and-swap write for its "
        "lease, so two nightly runs could both take the lease and overwrite each other's commits: write OUT to local "
        "disk or to S3 with conditional writes, or pass --unsafe-single-writer if only one run can ever write it")
