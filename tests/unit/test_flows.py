"""The flows the suite must keep running: each is a `@pytest.mark.flow(...)` on a system test, and a flow whose
marker disappears (a test deleted, renamed away or skipped for good) fails here, whatever was collected."""

from __future__ import annotations

import ast
from pathlib import Path

SYSTEM = Path(__file__).resolve().parents[1] / "system"

# what each flow proves, in a few words; the test that carries the marker says the rest
FLOWS = {
    "embedded-ray": "segment on an embedded Ray, in the test process",
    "embedded-start": "a command that starts its own embedded Ray, in its own process",
    "ray-start-joined": "a command joins the Ray that `ray start --head` runs on this machine",
    "terminal": "what a person at a terminal sees: progress, Ray's lines in a file",
    "s3": "inputs and outputs on S3 (moto server on 127.0.0.1, s3fs)",
    "storage-outage": "the object store fails for a while mid-run",
    "actor-killed": "a predictor actor SIGKILLed mid-run",
    "node-removed": "a worker node removed mid-run",
    "bad-inputs": "a corpus of broken files: one error row each",
    "large-image": "a large image tiled in bounded memory",
    "large-image-regions": "a huge image's regions over two actors: a mask store equal to one sliding window, twice alike",
    "secrets": "credentials never reach logs, summaries or output",
    "two-node-cluster": "jobs on a real two-node `ray start` cluster with token auth",
    "job-submit": "`ray job submit` entrypoints",
    "ddp": "DDP training on two Ray Train workers",
    "ddp-across-nodes": "a training job with one rank on each node",
    "train-worker-killed": "a training worker killed, the run resumed from its checkpoint",
    "deep-images": "16-bit images trained and segmented",
    "planned-training": "`rayseg plan` and `rayseg train` plan from the data; the card records it and segment follows it",
    "real-images": "real sample images from registry packages",
    "browser": "the HTML report in headless Chromium",
    "demo": "the demo end to end",
    "evaluate": "evaluate against a single-process reference",
    "bench": "rayseg bench produces every figure",
    "lease-takeover-fenced": "a nightly run stalled between renewal and commit is fenced out by the run that took over",
    "nightly": "nightly commits each shard once and reprocesses what changed",
    "nightly-driver-killed": "the nightly driver SIGKILLed at random moments, then run to the end",
    "nightly-s3": "nightly with shards and output on S3",
    "nightly-killed": "nightly killed at 85%, locally and on S3: at most one wave redone",
    "nightly-waves-by-time": "waves closed by time keep most of a killed run's work; the rerun takes over at once",
    "lease-two-runs": "two nightly runs on one output: one writes, the other waits or exits",
    "nightly-reader-polling": "readers polling during runs see whole shards once",
    "lease-takeover": "a killed run's lease from another host expires and is taken over",
    "nightly-objects": "objects committed with their images across a kill",
    "own-model-export": "a checkpoint exported to ONNX and .pt2 segments like the checkpoint",
    "own-model-hf": "a Hugging Face SegFormer folder segments end to end",
    "own-model-nightly": "nightly with an ONNX model reprocesses when the file changes",
    "nightly-large-image": "nightly segments a huge image by region (locally and on S3) and commits its one row with the others, exactly once",
}


def flows_in(path: Path) -> dict[str, list[str]]:
    """{flow: [test names]} from the `pytest.mark.flow(...)` decorators of one test file."""
    found: dict[str, list[str]] = {}
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.FunctionDef) or not node.name.startswith("test"):
            continue
        for deco in node.decorator_list:
            if isinstance(deco, ast.Call) and ast.unparse(deco.func) == "pytest.mark.flow":
                for arg in deco.args:
                    found.setdefault(arg.value, []).append(f"{path.name}::{node.name}")
    return found


def all_flows() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for path in sorted(SYSTEM.glob("test_*.py")):
        for flow, tests in flows_in(path).items():
            found.setdefault(flow, []).extend(tests)
    return found


def test_every_flow_has_a_system_test_that_carries_its_marker():
    found = all_flows()
    missing = sorted(set(FLOWS) - set(found))
    assert not missing, f"flows no system test carries any more: {missing}"


def test_every_marked_flow_is_listed():
    unknown = sorted(set(all_flows()) - set(FLOWS))
    assert not unknown, f"flow markers not listed in FLOWS (a typo, or a new flow to list): {unknown}"


def test_the_scan_reads_decorators_as_pytest_does(tmp_path):
    (tmp_path / "test_x.py").write_text('import pytest\n\n@pytest.mark.flow("a", "b")\n@pytest.mark.timeout(5)\n'
                                        'def test_one():\n    pass\n\n# @pytest.mark.flow("c")\ndef test_two():\n    pass\n')
    assert flows_in(tmp_path / "test_x.py") == {"a": ["test_x.py::test_one"], "b": ["test_x.py::test_one"]}
