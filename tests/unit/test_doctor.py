"""`rayseg doctor`: without CUDA, --gpu refuses in one sentence (exit 1); the versions alone always work; a step that
overruns its share of the five minutes is stopped and reported, not waited for."""

from __future__ import annotations

import json

import pytest
import torch

from rayseg import cli
from rayseg.doctor import run_step

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where CUDA cannot start")


@no_cuda
def test_doctor_gpu_without_cuda_refuses_in_one_sentence(capsys, tmp_path):
    code = cli.main(["doctor", "--gpu", "--json", str(tmp_path / "d.json")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert len(err) == 1 and err[0].startswith("rayseg doctor: error: rayseg doctor --gpu needs CUDA, but ")
    assert not (tmp_path / "d.json").exists()


def test_doctor_without_gpu_reports_the_versions(capsys, tmp_path):
    assert cli.main(["doctor", "--json", str(tmp_path / "d.json")]) == 0
    report = json.loads((tmp_path / "d.json").read_text())
    assert report["versions"]["torch"] == torch.__version__ and report["versions"]["torch_cuda"] == torch.version.cuda
    assert json.loads(capsys.readouterr().out)["versions"] == report["versions"]


def test_a_step_past_its_timeout_is_stopped_and_reported(tmp_path):
    result = run_step("predictor", tmp_path, timeout=0.5)
    assert result["ok"] is False and "timed out" in result["error"]
