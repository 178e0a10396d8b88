"""rayseg evaluate command lines that are refused before any work starts."""

from __future__ import annotations

from rayseg.cli import main


def test_evaluate_cli_bad_checkpoint_is_one_line(tmp_path, capsys):
    assert main(["evaluate", "--checkpoint", str(tmp_path), "--data", str(tmp_path)]) == 2
    assert "is not a rayseg checkpoint" in capsys.readouterr().err
