"""Intensity normalisation: how stored pixel values (8-bit, 16-bit, signed, float; any channel count) become model input.

`--intensity` (train records it in model.json; segment, evaluate and nightly apply the record; a flag given there
overrides it, with a warning):

    auto                 8-bit images as always (value / 255); deeper ones (16-bit, signed, float): percentile 1 99.8
    percentile[:LO:HI]   per image and channel, the LO-th..HI-th percentiles map to 0..1, clipped (csbdeep's and
                         stardist's 1 and 99.8 by default; cellpose uses 1 and 99); outliers such as hot pixels
                         do not move the window while they are fewer than 100 - HI percent of the image
    dataset              nnU-Net's CT scheme: clip each channel to the training set's 0.5..99.5 percentiles, then
                         z-score with the training set's mean and std, all measured over the labelled foreground
                         pixels of the training set by `rayseg train` (a distributed pass, `measure`)
    nonzero              nnU-Net's scheme for MRI and other data without physical units: per image and channel, a
                         z-score over the non-zero pixels; pixels that are 0 (the background outside the body) stay 0
    fixed:LO:HI          a known window, e.g. CT soft tissue fixed:-160:240, maps to 0..1, clipped
    none                 values as they are, read as if on the 8-bit scale (for data already scaled that way)

A checkpoint whose card has no record (written before rayseg recorded one) gets what earlier versions did:
decode.to_uint8 (16-bit / 257); 16-bit images that use less than 1/64 of their range then draw one warning.

Every mode maps an image onto the scale of an 8-bit image, 0..255, where the card's mean and std (in 0..1 units,
times 255) then standardise it on the device, as they always have. An 8-bit image under auto, or an image under
the record-less rule, stays uint8 all the way to the device (the fast path: a quarter of the bytes to copy);
every other image leaves here as float32. `dataset` folds its z-score into that scale, so the device computes
exactly (clip(x) - mean_dataset) / std_dataset, and `nonzero` its per-image z-score the same way.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import numpy as np

from rayseg.errors import UserError

log = logging.getLogger("rayseg")

MODES = ("auto", "percentile", "dataset", "nonzero", "fixed", "none", "legacy")
PERCENTILES = (1.0, 99.8)  # csbdeep/stardist's normalize() defaults
DATASET_PERCENTILES = (0.5, 99.5)  # nnU-Net's CT normalisation
EXACT_RANGE = 1 << 20  # integer data spanning at most this many values gets one histogram bin per value: exact percentiles
FLOAT_BINS = 1 << 16  # float data: this many bins between the smallest and largest value
SPARSE_RANGE = 1 / 64  # a 16-bit image whose maximum is below this fraction of 65535 is "using little of its range"


@dataclass(frozen=True)
class Intensity:
    """One normalisation. `low`/`high`: percentiles (percentile, dataset) or values (fixed); dataset also holds
    the measured per-channel `window` (values at those percentiles), `mean`, `std` and the `pixels` counted."""

    mode: str = "auto"
    low: float = 0.0
    high: float = 0.0
    window: tuple[tuple[float, float], ...] = ()
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    pixels: int = 0

    def spec(self) -> str:
        """The --intensity text that names this normalisation (dataset's numbers live in the card)."""
        if self.mode == "percentile":
            return f"percentile:{self.low:g}:{self.high:g}"
        if self.mode == "fixed":
            return f"fixed:{self.low:g}:{self.high:g}"
        return self.mode

    def measured(self) -> bool:
        return self.mode != "dataset" or bool(self.window)

    def to_json(self) -> dict | None:
        if self.mode == "legacy":
            return None  # a card without a record
        d: dict = {"mode": self.mode, "spec": self.spec()}
        if self.mode in ("percentile", "fixed", "dataset"):
            d.update(low=self.low, high=self.high)
        if self.mode == "dataset":
            d.update(window=[list(w) for w in self.window], mean=list(self.mean), std=list(self.std), pixels=self.pixels)
        return d

    @classmethod
    def from_json(cls, d: dict | None) -> "Intensity":
        if not d:
            return cls("legacy")
        return cls(d["mode"], float(d.get("low", 0)), float(d.get("high", 0)), tuple(tuple(float(v) for v in w) for w in d.get("window", ())),
                   tuple(float(v) for v in d.get("mean", ())), tuple(float(v) for v in d.get("std", ())), int(d.get("pixels", 0)))


def parse(spec: str) -> Intensity:
    """--intensity text -> Intensity; UserError saying what is accepted."""
    usage = "--intensity must be auto, percentile[:LO:HI], dataset, nonzero, fixed:LO:HI or none"
    head, *nums = spec.strip().split(":")
    try:
        values = [float(v) for v in nums]
    except ValueError:
        raise UserError(f"{usage}; got {spec!r}") from None
    if head in ("auto", "dataset", "nonzero", "none") and not values:
        return Intensity(head, *(DATASET_PERCENTILES if head == "dataset" else ()))
    if head == "percentile" and len(values) in (0, 2):
        lo, hi = values or PERCENTILES
        if not 0 <= lo < hi <= 100:
            raise UserError(f"--intensity {spec}: need 0 <= LO < HI <= 100")
        return Intensity("percentile", lo, hi)
    if head == "fixed" and len(values) == 2:
        if not values[0] < values[1]:
            raise UserError(f"--intensity {spec}: need LO < HI")
        return Intensity("fixed", *values)
    raise UserError(f"{usage}; got {spec!r}")


def check_spec(flag: str, value: str) -> None:
    """The option check of --intensity ("" = the checkpoint's)."""
    if value:
        parse(value)


def resolve(record: dict | None, override: str = "") -> Intensity:
    """The normalisation a predictor applies: the card's record, unless --intensity overrides it (with a warning)."""
    card = Intensity.from_json(record)
    if not override:
        return card
    wanted = parse(override)
    if wanted.mode == "dataset":
        if card.mode != "dataset":
            raise UserError("--intensity dataset needs a training set's statistics; only a checkpoint trained with it has them")
        wanted = card
    if wanted != card:
        log.warning("--intensity %s overrides the checkpoint's normalisation (%s); masks will differ from what it was "
                    "validated with", wanted.spec(), card.spec() if record else "none recorded: 16-bit / 257")
    return wanted


def effective(record: dict | None, override: str = "") -> str:
    """The normalisation applied, as text (nightly's options key, summaries); dataset's numbers are the card's."""
    return resolve(record, override).spec() if override else Intensity.from_json(record).spec()


# ---- per image: numpy on the host ----------------------------------------------------------------------------


def _window_map(img: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Per channel, [lo, hi] -> [0, 255] clipped, as float32; a channel with hi <= lo becomes 0."""
    lo, hi = lo.astype(np.float32), hi.astype(np.float32)
    span = hi - lo
    scale = np.where(span > 0, 255.0 / np.where(span > 0, span, 1), 0).astype(np.float32)
    out = (img.astype(np.float32) - lo) * scale
    return np.clip(out, 0, 255, out=out)


def percentile_window(img: np.ndarray, low: float, high: float) -> tuple[np.ndarray, np.ndarray]:
    """Per channel, the low-th and high-th percentiles (numpy's linear rule). Integer images are counted, not sorted:
    a histogram per channel gives the same values in a tenth of np.percentile's time on a 16-bit image."""
    flat = img.reshape(-1, img.shape[-1])
    if img.dtype.kind not in "iu" or not flat.size:
        return np.percentile(flat, (low, high), axis=0)
    offset = int(flat.min()) if img.dtype.kind == "i" else 0
    out = np.empty((2, flat.shape[1]))
    for c in range(flat.shape[1]):
        hist = np.bincount((flat[:, c].astype(np.int64) - offset) if offset else flat[:, c])
        out[:, c] = [hist_percentile(hist, q, offset, 1.0, True) for q in (low, high)]
    return out[0], out[1]


_warned_sparse = False


def warn_sparse_16bit(img: np.ndarray) -> None:
    """Once per process: a record-less checkpoint divides 16-bit images by 257, which flattens a narrow band."""
    global _warned_sparse
    if _warned_sparse or img.dtype != np.uint16 or not img.size or int(img.max()) >= SPARSE_RANGE * 65535:
        return
    _warned_sparse = True
    log.warning("16-bit images use less than 1/64 of their range (this one peaks at %d of 65535), and the checkpoint records "
                "no intensity normalisation, so they are divided by 257 as before and reach the model nearly black; "
                "retrain with this rayseg (it records one) or pass --intensity percentile", int(img.max()))


def normalise(img: np.ndarray, norm: Intensity, mean: tuple[float, ...] = (), std: tuple[float, ...] = ()) -> np.ndarray:
    """One (H, W, C) image in its own dtype -> uint8 (fast path) or float32 on the 8-bit scale (module docstring).
    `mean`/`std` (the card's, 0..1 units) are needed by the z-scores (dataset, nonzero) only."""
    mode = norm.mode
    if mode == "legacy":
        from rayseg.decode import to_uint8

        warn_sparse_16bit(img)
        return to_uint8(img)
    if mode in ("auto", "none") and img.dtype == np.uint8:
        return img
    if mode == "none":
        return img.astype(np.float32)
    if mode in ("auto", "percentile"):
        lo, hi = percentile_window(img, *((norm.low, norm.high) if mode == "percentile" else PERCENTILES))
        return _window_map(img, lo, hi)
    if mode == "fixed":
        return _window_map(img, np.float32(norm.low), np.float32(norm.high))
    if mode == "nonzero":
        return _folded(nonzero_zscore(img), img.shape[-1], mean, std)
    if mode == "dataset":
        if not norm.window:
            raise ValueError("dataset normalisation without measured statistics")
        if len(norm.window) != (c := img.shape[-1]):
            raise ValueError(f"dataset statistics are for {len(norm.window)} channel(s), the image has {c}")
        lo, hi = (np.array(v, np.float32) for v in zip(*norm.window))
        mu, sd = np.array(norm.mean, np.float32), np.array(norm.std, np.float32)
        return _folded((np.clip(img.astype(np.float32), lo, hi) - mu) / np.where(sd > 0, sd, 1), c, mean, std)
    raise ValueError(f"unknown intensity mode {mode!r}")


def _folded(z: np.ndarray, c: int, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """A z-scored image onto the 8-bit scale: the device computes (y / 255 - m) / s, which y = (z * s + m) * 255 makes z."""
    m, s = np.array(mean or (0.5,) * c, np.float32), np.array(std or (0.25,) * c, np.float32)
    return (z * s + m) * 255


def nonzero_zscore(img: np.ndarray) -> np.ndarray:
    """Per channel, (x - mean) / std over the pixels that are not 0; pixels that are 0 stay 0 (float32)."""
    x, nz = img.astype(np.float32), img != 0
    n = np.maximum(nz.sum((0, 1)), 1)
    mu = (x * nz).sum((0, 1), dtype=np.float64) / n
    sd = np.sqrt((np.square(x - mu) * nz).sum((0, 1), dtype=np.float64) / n)
    return np.where(nz, (x - mu) / np.where(sd > 0, sd, 1), 0).astype(np.float32)


def fit_channels(img: np.ndarray, channels: int) -> np.ndarray:
    """The image with the model's channel count: as is when they agree; grey repeated for a 3-channel model; the
    4th channel (alpha) dropped for one; ValueError naming both counts otherwise."""
    c = img.shape[-1]
    if c == channels:
        return img
    if channels == 3 and c == 4:
        return img[..., :3]
    if channels == 3 and c == 1:
        return np.repeat(img, 3, axis=-1)
    raise ValueError(f"image has {c} channel{'s' if c != 1 else ''}; the model takes {channels}")


class Inputs:
    """What happens to each decoded image before it goes to the device: its own dtype restored (Ray promotes a
    batch's images to one dtype), channels fitted to the model, intensities normalised by the card's record."""

    def __init__(self, card, override: str = ""):
        self.norm = resolve(card.intensity, override)
        self.channels = card.in_channels
        self.mean, self.std = tuple(card.mean), tuple(card.std)
        self.dtypes = tuple(getattr(card, "input_dtypes", ()))  # an exported graph for 8-bit pixels takes only those

    def one(self, img: np.ndarray, dtype: str | None = None, window: tuple | None = None) -> np.ndarray:
        """`window`: per channel (low, high) measured beforehand (a huge image's overview), in place of this
        image's own percentiles, so that every region of one image is normalised alike."""
        if img.ndim == 2:
            img = img[:, :, None]
        if dtype and img.dtype.name != dtype:
            img = img.astype(dtype)
        if self.dtypes and img.dtype.name not in self.dtypes:
            raise ValueError(f"the model takes {' or '.join(self.dtypes)} images; this one is {img.dtype.name}")
        c = img.shape[-1]
        if c == 4 and self.channels == 3:
            img, c = img[..., :3], 3
        grey_to_rgb = c == 1 and self.channels == 3
        if c != self.channels and not grey_to_rgb:
            fit_channels(img, self.channels)  # raises, naming both counts
        if window is not None:
            lo, hi = (np.array(v, np.float32) for v in zip(*window))
            out = _window_map(img, lo, hi)
        else:
            out = normalise(img, self.norm, self.mean[:1] if grey_to_rgb else self.mean, self.std[:1] if grey_to_rgb else self.std)
        return fit_channels(out, self.channels) if grey_to_rgb else out

    def __call__(self, images, dtypes, errors: list[str | None]) -> tuple[np.ndarray, list[str | None]]:
        """(images ready for the device, errors): a row whose image does not fit the model becomes an error row."""
        from rayseg.decode import ragged_column

        out, errors = list(images), list(errors)
        for i, img in enumerate(images):
            if errors[i] is None:
                try:
                    out[i] = self.one(img, None if dtypes is None else dtypes[i])
                except ValueError as e:
                    errors[i] = str(e)
        return ragged_column(out), errors


# ---- the training set's statistics, for `dataset` (and the channel count of every mode) ---------------------


def partial_stats(batch: dict[str, np.ndarray], sums: bool = False, histogram: tuple | None = None) -> dict[str, np.ndarray]:
    """One batch of training pairs -> one row: the channel counts and dtypes seen; with `sums`, per channel over the
    foreground pixels (target > 0; all pixels of an image without foreground) the count, sum, sum of squares, min
    and max; with `histogram` = (lo, hi, bins, integer), the histogram per channel. Image by image, so memory stays
    that of one image."""
    shapes: dict[int, int] = {}
    kinds: set[str] = set()
    dtypes = batch.get("dtype")
    acc: dict[str, np.ndarray] = {}
    for i, (img, target) in enumerate(zip(batch["image"], batch["target"])):
        img = img if img.ndim == 3 else img[:, :, None]
        if dtypes is not None and img.dtype.name != dtypes[i]:
            img = img.astype(dtypes[i])
        c = img.shape[-1]
        shapes[c] = shapes.get(c, 0) + 1
        kinds.add(img.dtype.name)
        if not (sums or histogram) or len(shapes) > 1:
            continue
        fg = np.asarray(target) > 0
        px = (img[fg] if fg.any() else img.reshape(-1, c)).astype(np.float64)
        if not acc:
            acc = {"count": np.zeros((), np.int64), "sum": np.zeros(c), "sumsq": np.zeros(c), "min": np.full(c, np.inf), "max": np.full(c, -np.inf)}
        acc["count"] += len(px)
        acc["sum"] += px.sum(0)
        acc["sumsq"] += (px * px).sum(0)
        acc["min"], acc["max"] = np.minimum(acc["min"], px.min(0, initial=np.inf)), np.maximum(acc["max"], px.max(0, initial=-np.inf))
        if histogram is not None:
            lo, hi, bins, integer = histogram
            idx = (px - lo).astype(np.int64) if integer else np.clip(((px - lo) / max(hi - lo, 1e-30) * bins).astype(np.int64), 0, bins - 1)
            h = np.stack([np.bincount(idx[:, k], minlength=bins) for k in range(c)])
            acc["hist"] = acc["hist"] + h if "hist" in acc else h
    out = {"channels": np.array([json.dumps(sorted(shapes.items()))], dtype=object), "dtypes": np.array([json.dumps(sorted(kinds))], dtype=object)}
    if len(shapes) == 1:
        out.update({k: v[None] for k, v in acc.items()})
    return out


def combine_stats(rows: list[dict]) -> dict:
    """partial_stats' rows (one per batch) -> the training set's totals."""
    channels: dict[int, int] = {}
    kinds: set[str] = set()
    for r in rows:
        for c, n in json.loads(str(r["channels"])):
            channels[c] = channels.get(c, 0) + n
        kinds |= set(json.loads(str(r["dtypes"])))
    total = {"channels": channels, "dtypes": sorted(kinds)}
    if len(channels) == 1 and rows:
        for k, f in (("count", np.sum), ("sum", np.sum), ("sumsq", np.sum), ("min", np.min), ("max", np.max), ("hist", np.sum)):
            if k in rows[0]:
                total[k] = f(np.stack([np.asarray(r[k]) for r in rows]), axis=0)
    return total


def hist_percentile(hist: np.ndarray, q: float, lo: float, width: float, integer: bool) -> float:
    """The q-th percentile of the values a histogram counts: numpy's linear rule, exact when each bin is one integer."""
    n = int(hist.sum())
    cum = np.cumsum(hist)
    pos = q / 100 * (n - 1)
    below, above = int(np.floor(pos)), int(np.ceil(pos))

    def value(rank: int) -> float:
        b = int(np.searchsorted(cum, rank + 1))
        if integer:
            return lo + b
        inside = (rank - (cum[b] - hist[b])) + 0.5  # spread a bin's values evenly over it
        return lo + (b + inside / hist[b]) * width

    v0, v1 = value(below), value(above)
    return v0 + (v1 - v0) * (pos - below)


def measure(rows_of, spec: Intensity, first: dict | None = None) -> tuple[dict, Intensity]:
    """The training set's channel counts and dtypes and, for `dataset`, its statistics.

    `rows_of(fn, kwargs)` runs `partial_stats` over every batch and returns the rows: a Ray Dataset's map_batches
    in `rayseg train`, a plain loop in one process; the sums are combined the same way in both. Integer data
    spanning at most EXACT_RANGE values gets exact percentiles (numpy's linear rule); float data 65,536 bins.
    `first`: the totals of a pass already made with sums (rayseg.fingerprint's), which this one then skips.
    """
    first = first if first is not None else combine_stats(rows_of(partial_stats, {"sums": spec.mode == "dataset"}))
    if spec.mode != "dataset" or len(first["channels"]) != 1 or not int(first.get("count", 0)):
        return first, spec
    lo, hi = float(first["min"].min()), float(first["max"].max())
    integer = all(np.dtype(k).kind in "biu" for k in first["dtypes"]) and hi - lo + 1 <= EXACT_RANGE
    bins = int(hi - lo + 1) if integer else FLOAT_BINS
    hist = combine_stats(rows_of(partial_stats, {"histogram": (lo, hi, bins, integer)}))["hist"]
    width = 1.0 if integer else max(hi - lo, 1e-30) / bins
    n, s, ss = first["count"].item(), first["sum"], first["sumsq"]
    mean = s / n
    std = np.sqrt(np.maximum(ss / n - mean * mean, 0))
    window = tuple((hist_percentile(h, spec.low, lo, width, integer), hist_percentile(h, spec.high, lo, width, integer)) for h in hist)
    return first, Intensity("dataset", spec.low, spec.high, window, tuple(float(m) for m in mean), tuple(float(v) for v in std), int(n))


def local_rows(batches):
    """`rows_of` for `measure` in one process, over an iterable of batches (re-iterable: a list)."""
    return lambda fn, kwargs: [{k: v[0] for k, v in fn(b, **kwargs).items()} for b in batches]  # one row per batch, as Ray gives


def dataset_rows(ds, batch_size: int = 64):
    """`rows_of` for `measure` over a Ray Dataset of decoded pairs."""
    def rows_of(fn, kwargs):
        return ds.map_batches(fn, fn_kwargs=kwargs, batch_size=batch_size, batch_format="numpy").take_all()
    return rows_of


def model_channels(channels: dict[int, int], wanted: int | None) -> int:
    """The channel count a model is built with: --in-channels, else the training images' (grey and RGB mixed: 3)."""
    seen = sorted(channels)
    if wanted:
        bad = [c for c in seen if c != wanted and not (wanted == 3 and c in (1, 4))]
        if bad:
            raise UserError(f"--in-channels {wanted}, but training images have {', '.join(map(str, bad))} channel(s)")
        return wanted
    if len(seen) == 1:
        return seen[0]  # 4 included: an RGBA file's alpha is dropped at decode, so 4 channels here are 4 bands
    if set(seen) <= {1, 3, 4}:
        return 3
    raise UserError(f"training images have different channel counts ({', '.join(f'{n} with {c}' for c, n in sorted(channels.items()))}); "
                    "give --in-channels or split the data")
