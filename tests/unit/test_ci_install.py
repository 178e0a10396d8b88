""".ci/no_backtracking.py: the CI check that the test extras install without pip backtracking."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / ".ci" / "no_backtracking.py"


def load():
    spec = importlib.util.spec_from_file_location("no_backtracking", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# lines as pip's --log writes them (pip 24-25), one resolution without and one with backtracking
CLEAN = """2026-12-01T10:00:01,001 Collecting boto3<1.43.118,>=1.43.115 (from rayseg==0.1.0)
2026-12-01T10:00:01,002   Downloading boto3-1.43.117-py3-none-any.whl.metadata (6.7 kB)
2026-12-01T10:00:02,003   Using cached https://files.pythonhosted.org/packages/ab/cd/botocore-1.43.117-py3-none-any.whl (13.4 MB)
2026-12-01T10:00:02,004   Downloading boto3-1.43.117-py3-none-any.whl (139 kB)
2026-12-01T10:00:03,005   Downloading pycocotools-2.0.10.tar.gz (25 kB)
2026-12-01T10:00:03,006   Using cached python_dateutil-2.9.0.post0-py2.py3-none-any.whl.metadata (8.4 kB)
"""
BACKTRACKED = CLEAN + """2026-12-01T10:00:04,007 INFO: pip is looking at multiple versions of boto3 to determine which version is compatible with other requirements. This could take a while.
2026-12-01T10:00:04,008   Downloading boto3-1.43.116-py3-none-any.whl.metadata (6.7 kB)
"""


def test_one_version_of_each_package_passes(tmp_path, capsys):
    ci = load()
    assert dict(ci.versions_fetched(CLEAN.splitlines())) == {
        "boto3": {"1.43.117"}, "botocore": {"1.43.117"}, "pycocotools": {"2.0.10"}, "python-dateutil": {"2.9.0.post0"}}
    (tmp_path / "pip.log").write_text(CLEAN)
    assert ci.main(str(tmp_path / "pip.log")) == 0
    assert "one version each (boto3 1.43.117)" in capsys.readouterr().out


def test_backtracking_fails_and_names_the_package(tmp_path, capsys):
    ci = load()
    (tmp_path / "pip.log").write_text(BACKTRACKED)
    assert ci.main(str(tmp_path / "pip.log")) == 1
    out = capsys.readouterr().out
    assert "'boto3': ['1.43.116', '1.43.117']" in out and "looked at multiple versions of boto3" in out


def test_an_install_into_a_ready_venv_fetches_nothing_and_passes(tmp_path, capsys):
    (tmp_path / "pip.log").write_text("Requirement already satisfied: boto3<1.43.118,>=1.43.115 in ./.venv/lib/python3.11/site-packages\n")
    assert load().main(str(tmp_path / "pip.log")) == 0
    assert "nothing fetched" in capsys.readouterr().out
