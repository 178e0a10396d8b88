"""`rayseg demo`: the whole loop on synthetic data, offline, in a few minutes on a laptop.

    rayseg demo --workdir /tmp/rayseg-demo

synthesize labelled shapes (train, val, held-out test) and a held-out unlabelled archive -> train a UNet with
2 Ray Train workers -> segment the unlabelled archive with OUT/best -> evaluate on the held-out labelled set
-> write report.html (overlays of the segmentation, class areas, confidence, errors) -> print its file:// URL
first, then the held-out mIoU and where everything is.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

from rayseg.cliutil import add_command
from rayseg.config import DemoConfig
from rayseg.errors import UserError

log = logging.getLogger("rayseg")

MARKER = ".rayseg-demo"  # a workdir holding this was made by the demo, and the demo may clear it


def _prepare(workdir: str) -> None:
    if os.path.isdir(workdir) and os.listdir(workdir):
        if not os.path.exists(os.path.join(workdir, MARKER)):
            raise UserError(f"{workdir} is not empty and was not made by `rayseg demo`; give another --workdir")
        shutil.rmtree(workdir)  # a fresh run each time: a rerun should show the same thing, not resume
    os.makedirs(workdir, exist_ok=True)
    open(os.path.join(workdir, MARKER), "w").close()


def demo(workdir: str = "rayseg-demo", *, train_count: int = 256, val_count: int = 48, test_count: int = 48,
         unlabelled_count: int = 48, size: int = 64, num_classes: int = 3, epochs: int = 10, batch_size: int = 8,
         lr: float = 3e-3, workers: int = 2, seed: int = 0, address: str | None = None, dashboard: bool = False) -> dict:
    """Run the demo; returns {paths..., miou, timings}. The defaults reach mIoU >= 0.85 on 2 CPU cores."""
    from rayseg.cliutil import config_from
    from rayseg.config import ReportConfig
    from rayseg.evaluate import evaluate
    from rayseg.metrics import format_table
    from rayseg.report import report as write_report
    from rayseg.runtime import ensure_ray
    from rayseg.segment import segment
    from rayseg.synth import write_archive
    from rayseg.train import train

    t0 = time.perf_counter()
    workdir = os.path.abspath(workdir)
    _prepare(workdir)
    data = os.path.join(workdir, "data")
    # sizes vary around the model input, so that resizing in and out of the model is part of what is tested
    shapes = dict(generator="shapes", num_classes=num_classes, min_size=max(16, size - size // 8), max_size=size + size // 8)
    write_archive(f"{data}/train", "h5", train_count, labelled=True, seed=seed + 1, shards=2, **shapes)
    write_archive(f"{data}/val", "h5", val_count, labelled=True, seed=seed + 2, **shapes)
    test = write_archive(f"{data}/test", "tar", test_count, labelled=True, seed=seed + 3, **shapes)
    write_archive(f"{data}/unlabelled", "files", unlabelled_count, labelled=False, seed=seed + 4, **shapes)
    t_data = time.perf_counter()
    log.info("demo: synthesised %d training, %d validation, %d test and %d unlabelled images in %s",
             train_count, val_count, test_count, unlabelled_count, data)

    ensure_ray(address, quiet=True, dashboard=dashboard)
    run = os.path.join(workdir, "run")
    log.info("demo: training a UNet for %d epochs with %d Ray Train workers", epochs, workers)
    trained = train(data=(f"{data}/train",), val_data=(f"{data}/val",), output=run, model="unet", num_classes=num_classes,
                    class_names=tuple(test["class_names"]), input_size=size, epochs=epochs, batch_size=batch_size, lr=lr,
                    workers=workers, seed=seed, quiet=True)
    t_train = time.perf_counter()
    best = trained["best"]
    segments = os.path.join(workdir, "segments")
    log.info("demo: segmenting the %d unlabelled images with the best checkpoint", unlabelled_count)
    segmented = segment(inputs=(f"{data}/unlabelled",), output=segments, checkpoint=best, quiet=True)
    t_segment = time.perf_counter()
    log.info("demo: evaluating on the %d held-out test images", test_count)
    scores = evaluate(checkpoint=best, data=(f"{data}/test",), json=os.path.join(workdir, "eval.json"), quiet=True)
    t_evaluate = time.perf_counter()
    html = write_report(config_from(ReportConfig, {"output": segments, "html": os.path.join(workdir, "report.html"), "seed": seed}))["html"]
    t_end = time.perf_counter()
    result = {
        "report": html,
        "report_url": Path(html).resolve().as_uri(),
        "workdir": workdir,
        "data": data,
        "run": run,
        "best_checkpoint": best,
        "train_summary": os.path.join(run, "train_summary.json"),
        "segments": segmented["images_table"],
        "segment_summary": os.path.join(segments, "_rayseg.json"),
        "evaluation": os.path.join(workdir, "eval.json"),
        "best_val_miou": trained["best_metrics"]["val_miou"],
        "test_miou": scores["miou"],
        "test_images": scores["pairs"],
        "segmented_images": segmented["images"],
        "table": format_table(scores, scores["classes"]),
        "timings_s": {"synthesize": round(t_data - t0, 1), "train": round(t_train - t_data, 1), "segment": round(t_segment - t_train, 1),
                      "evaluate": round(t_evaluate - t_segment, 1), "report": round(t_end - t_evaluate, 1), "total": round(t_end - t0, 1)},
    }
    return result


def register(sub) -> None:
    add_command(sub, "demo", DemoConfig, lambda cfg: print(report(demo(cfg.workdir, address=cfg.address, dashboard=cfg.dashboard))),
                help="synthesize data, train, segment and evaluate: the whole loop in minutes, offline", description=__doc__.split("\n\n")[0])


def report(r: dict) -> str:
    """What the demo prints: the report first (a URL a terminal can open), the held-out scores, where everything is."""
    return f"""report             {r['report_url']}
  (the segmentation's overlays, class areas, confidence and errors; open it in a browser)

""" + r["table"] + f"""
held-out test mIoU {r['test_miou']:.4f} on {r['test_images']} images (best validation mIoU {r['best_val_miou']:.4f})

  synthetic data     {r['data']}/{{train,val,test,unlabelled}}
  training run       {r['run']}  (summary: {r['train_summary']})
  best checkpoint    {r['best_checkpoint']}
  segmentation       {r['segments']}  ({r['segmented_images']} images; summary: {r['segment_summary']})
  evaluation         {r['evaluation']}

timings (s): {json.dumps(r['timings_s'])}

next: rayseg segment YOUR_IMAGES --checkpoint {r['best_checkpoint']} --output OUT"""
