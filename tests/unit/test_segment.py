"""rayseg segment command lines that are refused: one line on stderr, exit 2, nothing written, Ray never started."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import png_bytes
from rayseg import cli


@pytest.mark.parametrize(
    "argv,words",
    [
        (["/nonexistent/dir/x.png"], "does not exist"),
        (["/tmp/*.no-such-extension-anywhere"], "matches no files"),
        (["IN", "--batch-size", "0"], "--batch-size"),
        (["IN", "--actors", "3:1"], "--actors"),
        (["IN", "--storage-options", "{not json"], "JSON"),
        (["IN", "--checkpoint", "/nonexistent/ckpt"], "not a rayseg checkpoint"),
        (["IN", "--model", "unet", "--weights", "DEFAULT"], "no pretrained weights"),
    ],
)
def test_bad_command_lines_get_one_line_and_exit_2(tmp_path, capsys, argv, words):
    img = tmp_path / "a.png"
    img.write_bytes(png_bytes(np.zeros((8, 8, 3), np.uint8)))
    argv = [str(img) if a == "IN" else a for a in argv]
    out = tmp_path / "out"
    with pytest.raises(SystemExit) if "JSON" in words else _nothing() as ctx:
        code = cli.main(["segment", *argv, "--output", str(out)])
    if ctx is None:
        assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert words in err[-1]
    assert not out.exists(), "no output is left behind by a refused command"


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("argv,words", [
    (["{root}/nothing-here-*.png"], ("glob", "matches no files")),
    (["{root}/no-such-file.png"], ("does not exist",)),
    (["{root}/no-such-folder/"], ("does not exist",)),
])
def test_missing_inputs_fail_before_any_output(tmp_path, capsys, argv, words):
    out = tmp_path / "out"
    args = ["segment", *[a.format(root=tmp_path) for a in argv], "--output", str(out), "--model", "unet", "--input-size", "32", "--quiet"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and all(w in err[0] for w in words), err
    assert not out.exists()
