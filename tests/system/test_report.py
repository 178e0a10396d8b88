"""`rayseg report`: the HTML page of a real segment output, opened in a real headless browser (Chromium)."""

from __future__ import annotations

import html
import re
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import png_bytes
from rayseg import cli, segment
from .test_objects import blobs, make_checkpoint

CHROMIUM = Path("/usr/bin/chromium")
EVIL = "<img src=x onerror=alert(1)>"  # a file name is user data: it must reach the page as text


@pytest.fixture(scope="module")
def segmented(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    rng = np.random.default_rng(5)
    (root / "in").mkdir()
    for i, (h, w) in enumerate([(48, 64), (64, 64), (40, 72), (300, 280)]):
        (root / "in" / f"img{i}.png").write_bytes(png_bytes(blobs(rng, h, w)))
    (root / "in" / f"{EVIL}.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    out = root / "out"
    segment(inputs=(str(root / "in"),), output=str(out), checkpoint=make_checkpoint(root / "ckpt"), batch_size=4, quiet=True)
    (root / "in" / "img1.png").unlink()  # gone since the run: its overlay shows the mask alone
    return root, out


def chromium(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'chromium-profile'}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.mark.flow("browser")
def test_report_page(segmented, tmp_path):
    root, out = segmented
    page, pngs = tmp_path / "report.html", tmp_path / "png"
    assert cli.main(["report", str(out), "--html", str(page), "--sample", "10", "--png", str(pngs), "--seed", "1"]) == 0
    text = page.read_text()

    assert EVIL not in text and html.escape(EVIL) in text
    assert "not a decodable image" in text  # the error row, in the errors table
    assert text.count("source not readable") == text.count("in/img1.png</div>") >= 1
    assert "http://" not in text.replace("http://www.w3.org/2000/svg", "") and "https://" not in text  # nothing fetched from outside
    assert text.count("<svg") == 4  # area fraction of background, thing, stuff, and confidence
    assert "background" in text and "thing" in text and "stuff" in text

    files = sorted(pngs.glob("*.png"))
    assert len(files) == 4  # every good image is in the sample; each overlay is written once
    for f in files:
        pic = cv2.imread(str(f))
        assert pic is not None and max(pic.shape[:2]) <= 256 and len(np.unique(pic.reshape(-1, 3), axis=0)) > 3
    big = [f for f in files if "img3" in f.name]
    assert cv2.imread(str(big[0])).shape[:2] == (256, 239)  # 300x280 downscaled to 256 on its long side

    # the same seed picks the same sample
    again = tmp_path / "again.html"
    assert cli.main(["report", str(out), "--html", str(again), "--sample", "2", "--seed", "7"]) == 0
    again2 = tmp_path / "again2.html"
    assert cli.main(["report", str(out), "--html", str(again2), "--sample", "2", "--seed", "7"]) == 0
    sample = lambda p: re.search(r"Random sample.*?</div></div></div>", p.read_text(), re.S).group(0)  # noqa: E731
    assert sample(again) == sample(again2)

    if not CHROMIUM.exists():
        pytest.skip("no /usr/bin/chromium (apt-get install -y chromium) to open the page in a browser")
    dom = chromium(["--dump-dom", page.as_uri()], tmp_path)
    body = re.search(r"<body[^>]*>", dom.stdout).group(0)
    assert 'data-loaded="1"' in body, "the inline script did not run at load"
    n_img = text.count("<img ")
    assert f'data-images-ok="{n_img}"' in body and 'data-images-broken="0"' in body
    assert "<title>rayseg report: 5 images</title>" in dom.stdout

    shot = tmp_path / "shot.png"
    r = chromium([f"--screenshot={shot}", "--window-size=1280,2000", page.as_uri()], tmp_path)
    assert shot.exists(), r.stderr[-2000:]
    pic = cv2.imread(str(shot))
    assert pic.shape[:2] == (2000, 1280)
    non_white = (pic < 245).any(axis=2).mean()
    colours = len(np.unique(pic.reshape(-1, 3), axis=0))
    assert non_white > 0.05 and colours > 200, (non_white, colours)


def test_report_of_a_folder_that_is_not_an_output(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path), "--html", str(tmp_path / "r.html")]) == 2
    assert "not a rayseg segment output" in capsys.readouterr().err
