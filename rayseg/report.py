"""`rayseg report`: one static HTML page about a segment output, that opens offline in any browser.

    rayseg report out/ --html out/report.html --sample 24 --png out/overlays/

Summary, overlays (a seeded random sample plus the extremes: largest and smallest foreground fraction, lowest
mean confidence), histograms of class area fractions and confidence (inline SVG), and the error rows.
Everything is embedded (images as data URIs), no external JS or CSS.

Made for outputs of millions of rows: the first pass streams only the small columns and keeps running
histograms, a reservoir of the sample and the extremes; the second pass reads masks only for the chosen
image_ids (a filter on image_id), and only those source images are read back from their shards.
"""

from __future__ import annotations

import base64
import heapq
import html
import json
import logging
import time
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rayseg import storage
from rayseg.cliutil import add_command
from rayseg.config import ReportConfig
from rayseg.errors import UserError
from rayseg.layout import IMAGES_DIR, SUMMARY_FILE
from rayseg.table import read_table

log = logging.getLogger("rayseg")

SMALL_COLUMNS = ["image_id", "source", "height", "width", "class_pixels", "mean_confidence", "error"]
EXTREMES = 3  # overlays shown for each extreme
MAX_ERRORS_SHOWN = 1000
OVERLAY_SIDE = 256
BINS = 20
# fixed colours per class (RGB), class 0 (background) is left uncoloured; tab10 then tab20's light tones
PALETTE = [(0, 0, 0), (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207), (174, 199, 232), (255, 187, 120),
           (152, 223, 138), (255, 152, 150), (197, 176, 213), (196, 156, 148), (247, 182, 210), (219, 219, 141), (158, 218, 229)]


def colour(c: int) -> tuple[int, int, int]:
    if c < len(PALETTE):
        return PALETTE[c]
    rng = np.random.default_rng(c)  # beyond the palette: a fixed pseudo-random colour per class
    return tuple(int(v) for v in rng.integers(40, 216, 3))


# -- first pass: small columns, streamed -----------------------------------------------------------
class Scan:
    """Running state over the small columns: counts, histograms, reservoir sample, extremes, errors."""

    def __init__(self, sample: int, seed: int):
        self.rng = np.random.default_rng(seed)
        self.sample_n = sample
        self.rows = self.errors = 0
        self.reservoir: list[tuple[float, str]] = []  # (-key, id): a max-heap of the `sample` smallest random keys
        self.largest: list[tuple[float, str]] = []  # min-heap of (fg, id)
        self.smallest: list[tuple[float, str]] = []  # min-heap of (-fg, id)
        self.unsure: list[tuple[float, str]] = []  # min-heap of (-conf, id)
        self.error_rows: list[dict] = []
        self.area_hist: np.ndarray | None = None  # classes x BINS
        self.conf_hist = np.zeros(BINS, np.int64)
        self.info: dict[str, dict] = {}  # image_id -> fg, conf, size of rows that may be shown

    def add(self, batch: pa.RecordBatch) -> None:
        t = pa.Table.from_batches([batch])
        self.rows += t.num_rows
        bad = t["error"].is_valid()
        errs = t.filter(bad)
        self.errors += errs.num_rows
        room = MAX_ERRORS_SHOWN - len(self.error_rows)
        if room > 0 and errs.num_rows:
            self.error_rows += errs.select(["image_id", "source", "error"]).slice(0, room).to_pylist()
        ok = t.filter(pc.invert(bad)).filter(t.filter(pc.invert(bad))["class_pixels"].is_valid())
        if ok.num_rows == 0:
            return
        ids = ok["image_id"].to_pylist()
        k = len(ok["class_pixels"][0].as_py())
        pixels = pc.list_flatten(ok["class_pixels"]).to_numpy(zero_copy_only=False).reshape(-1, k).astype(np.float64)
        total = np.maximum(pixels.sum(axis=1), 1)
        frac = pixels / total[:, None]
        fg = 1 - frac[:, 0]
        conf = ok["mean_confidence"].to_numpy(zero_copy_only=False).astype(np.float64)
        if self.area_hist is None:
            self.area_hist = np.zeros((k, BINS), np.int64)
        for c in range(min(k, self.area_hist.shape[0])):
            self.area_hist[c] += np.histogram(frac[:, c], bins=BINS, range=(0, 1))[0]
        self.conf_hist += np.histogram(conf[np.isfinite(conf)], bins=BINS, range=(0, 1))[0]
        keys = self.rng.random(len(ids))
        hw = list(zip(ok["height"].to_pylist(), ok["width"].to_pylist()))
        for i, iid in enumerate(ids):
            kept = self._push(self.reservoir, -keys[i], iid, self.sample_n)
            kept |= self._push(self.largest, fg[i], iid, EXTREMES)
            kept |= self._push(self.smallest, -fg[i], iid, EXTREMES)
            if np.isfinite(conf[i]):
                kept |= self._push(self.unsure, -conf[i], iid, EXTREMES)
            if kept:
                self.info[iid] = {"fg": float(fg[i]), "conf": float(conf[i]), "height": hw[i][0], "width": hw[i][1]}

    @staticmethod
    def _push(heap: list, key: float, iid: str, n: int) -> bool:
        if n <= 0:
            return False
        if len(heap) < n:
            heapq.heappush(heap, (key, iid))
            return True
        if key > heap[0][0]:
            heapq.heapreplace(heap, (key, iid))
            return True
        return False

    def groups(self) -> list[tuple[str, list[str]]]:
        return [
            (f"Random sample (seeded, {len(self.reservoir)} of {self.rows - self.errors:,})", [i for _, i in sorted(self.reservoir, reverse=True)]),
            ("Largest foreground fraction", [i for _, i in sorted(self.largest, reverse=True)]),
            ("Smallest foreground fraction", [i for _, i in sorted(self.smallest, reverse=True)]),
            ("Lowest mean confidence", [i for _, i in sorted(self.unsure, reverse=True)]),
        ]


# -- second pass: masks of the chosen rows, and their sources ---------------------------------------
def read_masks(dataset, ids: list[str], storage_options: dict | None = None) -> tuple[dict[str, np.ndarray], set[str]]:
    """(image_id -> mask, the ids of huge images): a huge image's mask is a coarse level of its mask store."""
    import pyarrow.dataset as pads
    from rayseg.stats import decode_png, decode_rle

    if not ids:
        return {}, set()
    cols = [c for c in ("image_id", "height", "width", "mask_png", "mask_rle", "mask_url") if c in dataset.schema.names]
    table = dataset.to_table(columns=cols, filter=pads.field("image_id").isin(ids))
    out, huge = {}, set()
    for r in table.to_pylist():
        if r.get("mask_url"):
            from rayseg.maskstore import thumbnail

            huge.add(r["image_id"])
            try:
                out[r["image_id"]] = thumbnail(r["mask_url"], storage_options, 2 * OVERLAY_SIDE)
            except Exception as e:  # noqa: BLE001 - a store gone: the card says so
                log.warning("report: the mask store %s is not readable (%s)", r["mask_url"], e)
        elif r.get("mask_png"):
            out[r["image_id"]] = decode_png(r["mask_png"])
        elif r.get("mask_rle") is not None:
            out[r["image_id"]] = decode_rle(r["mask_rle"], r["height"], r["width"])
    return out, huge


def read_sources(ids: list[str], storage_options: dict, h5_key: str, image_column: str, huge: set[str] = frozenset()) -> dict[str, np.ndarray | str]:
    """image_id -> RGB image, or the reason it could not be read. Each shard is read once, up to its last wanted id;
    a huge image gives its overview level (rayseg.regions), never its whole pixels."""
    from rayseg.decode import decode
    from rayseg.regions import thumbnail
    from rayseg.shards import read_shard
    from rayseg.storage import kind_of

    by_shard: dict[str, set[str]] = defaultdict(set)
    out: dict[str, np.ndarray | str] = {}
    for iid in huge:
        try:
            out[iid] = thumbnail(iid, storage_options)
        except Exception as e:  # noqa: BLE001 - a source gone or changed: the overlay shows the mask alone
            out[iid] = f"source not readable ({type(e).__name__}: {e})"
    for iid in (i for i in ids if i not in huge):
        by_shard[iid.partition("::")[0]].add(iid)
    for shard, wanted in by_shard.items():
        try:
            kind = kind_of(shard)
            if kind is None:
                raise ValueError("unknown shard kind")
            for r in read_shard(shard, kind, storage_options, h5_key, image_column):
                if r["image_id"] not in wanted:
                    continue
                wanted.discard(r["image_id"])
                try:
                    out[r["image_id"]] = f"source not readable ({r['error']})" if r["error"] else decode(r["data"], r["format"])
                except Exception as e:  # noqa: BLE001 - the file changed since the run
                    out[r["image_id"]] = f"source not readable ({type(e).__name__}: {e})"
                if not wanted:
                    break
        except Exception as e:  # noqa: BLE001 - a source gone or changed: the overlay shows the mask alone
            for iid in wanted:
                out[iid] = f"source not readable ({type(e).__name__}: {e})"
            wanted.clear()
        for iid in wanted:
            out[iid] = "source not readable (no longer in its shard)"
    return out


def overlay(mask: np.ndarray, image: np.ndarray | None) -> np.ndarray:
    """RGB picture at most OVERLAY_SIDE px: the image with each class tinted in its colour and outlined, or the mask alone."""
    h, w = mask.shape
    scale = min(1.0, OVERLAY_SIDE / max(h, w))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    m = cv2.resize(mask, size, interpolation=cv2.INTER_NEAREST) if scale < 1 else mask
    lut = np.array([colour(c) for c in range(256)], np.uint8)
    coloured = lut[m]
    if image is not None:
        base = cv2.resize(image, size, interpolation=cv2.INTER_AREA) if scale < 1 else image.copy()
        fg = (m > 0)[..., None]
        pic = np.where(fg, (0.55 * base + 0.45 * coloured).astype(np.uint8), base)
    else:
        pic = np.where((m > 0)[..., None], coloured, np.full_like(coloured, 235))
    pic = np.ascontiguousarray(pic)
    for c in np.unique(m):
        if c == 0:
            continue
        contours, _ = cv2.findContours((m == c).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(pic, contours, -1, tuple(int(v * 0.6) for v in colour(int(c))), 1)
    return pic


def data_uri(rgb: np.ndarray, fmt: str = ".png") -> str:
    ok, buf = cv2.imencode(fmt, rgb[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 88] if fmt == ".jpg" else [])
    if not ok:
        raise RuntimeError("could not encode an overlay")
    mime = "image/jpeg" if fmt == ".jpg" else "image/png"
    return f"data:{mime};base64,{base64.b64encode(buf.tobytes()).decode('ascii')}"


# -- HTML ---------------------------------------------------------------------------------------------
def svg_histogram(counts: np.ndarray, title: str, fill: str, xlabel: str) -> str:
    w, h, pad = 360, 160, 28
    top = max(int(counts.max()), 1) if len(counts) else 1
    bw = (w - 2 * pad) / max(len(counts), 1)
    bars = []
    for i, n in enumerate(counts):
        bh = (h - 2 * pad) * n / top
        lo, hi = i / len(counts), (i + 1) / len(counts)
        bars.append(f'<rect x="{pad + i * bw:.1f}" y="{h - pad - bh:.1f}" width="{max(bw - 1, 1):.1f}" height="{bh:.1f}" '
                    f'fill="{fill}"><title>{lo:.2f}-{hi:.2f}: {int(n):,}</title></rect>')
    return (f'<figure class="hist"><svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img">'
            f'<text x="{pad}" y="16" font-size="13">{html.escape(title)}</text>'
            f'<line x1="{pad}" y1="{h - pad}" x2="{w - pad}" y2="{h - pad}" stroke="#444"/>'
            + "".join(bars)
            + f'<text x="{pad}" y="{h - 8}" font-size="11">0</text><text x="{w - pad - 6}" y="{h - 8}" font-size="11">1</text>'
            f'<text x="{w / 2 - 30:.0f}" y="{h - 8}" font-size="11">{html.escape(xlabel)}</text>'
            f'<text x="2" y="{pad + 4}" font-size="11">{top:,}</text></svg></figure>')


CSS = """body{font-family:system-ui,sans-serif;margin:24px;color:#222;background:#fff}
h1{font-size:22px}h2{font-size:18px;margin-top:28px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
.grid{display:flex;flex-wrap:wrap;gap:12px}.card{border:1px solid #ddd;padding:6px;width:520px;font-size:12px}
.card img{width:250px;height:auto;image-rendering:pixelated;vertical-align:top}.note{color:#b00}
.legend span{display:inline-block;margin-right:14px}.swatch{display:inline-block;width:14px;height:14px;vertical-align:middle;margin-right:4px;border:1px solid #888}
.hist{display:inline-block;margin:0 12px 12px 0}.id{word-break:break-all}"""


def card_html(iid: str, info: dict, mask: np.ndarray | None, source, png_name: str | None) -> tuple[str, np.ndarray | None]:
    e = html.escape
    meta = f'{info["width"]}x{info["height"]}, foreground {info["fg"]:.1%}, mean confidence {info["conf"]:.3f}'
    if mask is None:
        return f'<div class="card"><div class="id">{e(iid)}</div><div class="note">mask not found in the table</div></div>', None
    image = source if isinstance(source, np.ndarray) and source.shape[:2] == mask.shape else None
    note = ""
    if isinstance(source, str):
        note = source
    elif isinstance(source, np.ndarray) and image is None:
        note = f"source is {source.shape[1]}x{source.shape[0]} now, the mask {mask.shape[1]}x{mask.shape[0]}: showing the mask alone"
    pic = overlay(mask, image)
    parts = [f'<div class="card"><div class="id">{e(iid)}</div><div>{e(meta)}</div>']
    if image is not None:
        small = overlay(np.zeros_like(mask), image)
        parts.append(f'<img alt="image" src="{data_uri(small, ".jpg")}"> ')
    parts.append(f'<img alt="overlay" src="{data_uri(pic)}">')
    if note:
        parts.append(f'<div class="note">{e(note)}</div>')
    if png_name:
        parts.append(f'<div>{e(png_name)}</div>')
    parts.append("</div>")
    return "".join(parts), pic


def report(cfg: ReportConfig) -> dict:
    """Write the HTML report (and optional PNGs); returns what it counted."""
    t0 = time.perf_counter()
    so = cfg.storage_options
    images_url = storage.join(cfg.output, IMAGES_DIR)
    try:
        dataset = read_table(cfg.output, so)  # the one read path: a segment folder or a nightly table's snapshot
    except (FileNotFoundError, OSError) as e:
        raise UserError(f"{cfg.output} is not a rayseg segment output (no readable {IMAGES_DIR}/: {str(e).splitlines()[0]})") from None
    missing = [c for c in SMALL_COLUMNS if c not in dataset.schema.names]
    if missing:
        raise UserError(f"{images_url} lacks the columns {', '.join(missing)}: not a rayseg segment output")
    try:
        summary = storage.read_json(storage.join(cfg.output, SUMMARY_FILE), so)
    except FileNotFoundError:
        summary = {}

    scan = Scan(cfg.sample, cfg.seed)
    for batch in dataset.to_batches(columns=SMALL_COLUMNS, batch_size=65536):
        scan.add(batch)
    groups = scan.groups()
    chosen = list(dict.fromkeys(i for _, ids in groups for i in ids))
    masks, huge = read_masks(dataset, chosen, so)
    conf = summary.get("config", {})
    sources = read_sources(chosen, so, conf.get("h5_key", "images"), conf.get("image_column", "image"), huge)

    png_dir = Path(cfg.png) if cfg.png else None
    if png_dir:
        png_dir.mkdir(parents=True, exist_ok=True)
    cards: dict[str, str] = {}
    for n, iid in enumerate(chosen):
        png_name = f"{n:04d}_{safe_name(iid)}.png" if png_dir else None
        text, pic = card_html(iid, scan.info[iid], masks.get(iid), sources.get(iid), png_name)
        if png_dir and pic is not None:
            cv2.imwrite(str(png_dir / png_name), pic[..., ::-1])
        cards[iid] = text

    page = render(cfg, summary, scan, groups, cards)
    out = Path(cfg.html)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    result = {"html": str(out), "rows": scan.rows, "errors": scan.errors, "overlays": len(cards),
              "png": str(png_dir) if png_dir else None, "elapsed_s": round(time.perf_counter() - t0, 3)}
    log.info("report: %s", result)
    return result


def safe_name(image_id: str) -> str:
    keep = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in image_id.rsplit("/", 1)[-1])
    return keep[-80:] or "image"


def render(cfg: ReportConfig, summary: dict, scan: Scan, groups, cards: dict[str, str]) -> str:
    e = html.escape
    classes = summary.get("classes") or [f"class_{i}" for i in range(scan.area_hist.shape[0] if scan.area_hist is not None else 0)]
    rows = [("Output", cfg.output), ("Images (rows)", f"{scan.rows:,}"), ("Errors", f"{scan.errors:,}"),
            ("Model", summary.get("model", "?")), ("Classes", ", ".join(classes)),
            ("Elapsed", f'{summary["elapsed_s"]:.1f} s' if "elapsed_s" in summary else "?"),
            ("Started", summary.get("started_at", "?")), ("Inputs", " ".join(summary.get("config", {}).get("inputs", [])))]
    parts = [f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>rayseg report</title><style>{CSS}</style></head>',
             '<body data-loaded="0"><h1>rayseg report</h1>']
    if not summary:
        parts.append(f'<p class="note">No {SUMMARY_FILE}: the run did not finish, or this is a partial output.</p>')
    parts.append("<h2>Summary</h2><table>" + "".join(f"<tr><th>{e(k)}</th><td>{e(str(v))}</td></tr>" for k, v in rows) + "</table>")
    parts.append('<p class="legend">' + "".join(
        f'<span><span class="swatch" style="background:rgb{colour(c)}"></span>{e(name)}</span>' for c, name in enumerate(classes) if c > 0) + "</p>")
    parts.append("<h2>Distributions</h2><div>")
    if scan.area_hist is not None:
        for c, counts in enumerate(scan.area_hist):
            name = classes[c] if c < len(classes) else f"class_{c}"
            parts.append(svg_histogram(counts, f"area fraction: {name}", "rgb(%d,%d,%d)" % (colour(c) if c else (160, 160, 160)), "fraction of image"))
    parts.append(svg_histogram(scan.conf_hist, "mean confidence per image", "#555", "mean confidence") + "</div>")
    for title, ids in groups:
        if not ids:
            continue
        parts.append(f"<h2>{e(title)}</h2><div class=\"grid\">" + "".join(cards[i] for i in ids) + "</div>")
    parts.append(f"<h2>Errors ({scan.errors:,})</h2>")
    if scan.error_rows:
        shown = "" if scan.errors <= len(scan.error_rows) else f"<p>first {len(scan.error_rows):,} shown</p>"
        parts.append(shown + '<table id="errors"><tr><th>image_id</th><th>error</th></tr>' + "".join(
            f"<tr><td class=\"id\">{e(str(r['image_id']))}</td><td>{e(str(r['error']))}</td></tr>" for r in scan.error_rows) + "</table>")
    else:
        parts.append("<p>none</p>")
    # Set at load: a headless browser's --dump-dom shows these only if the page loaded and its script ran.
    parts.append("<script>window.addEventListener('load', function () {"
                 "var imgs = Array.prototype.slice.call(document.images);"
                 "var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;"
                 "document.body.dataset.imagesOk = ok; document.body.dataset.imagesBroken = imgs.length - ok;"
                 f"document.body.dataset.loaded = '1'; document.title = {json.dumps(f'rayseg report: {scan.rows:,} images')};"
                 "});</script></body></html>")
    return "\n".join(parts)


def register(sub) -> None:
    add_command(sub, "report", ReportConfig, lambda cfg: print(json.dumps(report(cfg))),
                help="write a static HTML report (overlays, histograms, errors) of a segment output", description=__doc__.split("\n\n")[0])
