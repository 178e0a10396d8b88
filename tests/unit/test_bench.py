"""`rayseg bench --repeat N`: each figure is the median of the rounds' own figures, and the table prints every round."""

from __future__ import annotations

from rayseg.bench import median_of, table


def one_round(scale: float) -> dict:
    """The sections `rayseg bench` measures in a round, with figures proportional to `scale`."""
    path = {"steady_images_per_s": 60 * scale, "steady_ratio": 0.9 * scale, "steady_method": "difference", "e2e_images_per_s": 40 * scale,
            "e2e_ratio": 0.6 * scale, "e2e_s": 50 / scale, "small_e2e_s": 10 / scale, "run_s": 40 / scale, "small_run_s": 5 / scale,
            "peak_rss_mb": 1000.0, "small_peak_rss_mb": 900.0, "memory_growth": 1.1 * scale, "cpu_ms_per_image": 30.0, "device_busy": None,
            "startup_s": 5 / scale}
    pipeline = {**path, "exit_s": 55 / scale, "spill_mb": 0.0, "errors": 0, "startup_interpreter_s": 0.1, "startup_command_s": 0.6,
                "startup_model_checked_s": 5.0, "startup_ray_ready_s": 6.0, "startup_predictor_ready_s": 15.0, "startup_first_batch_s": 16.0,
                "startup_dashboard": False}
    return {"machine": {"cpu": "test CPU", "cores": 2, "ram_gib": 8.0, "load_1m": 1.0, "load_1m_end": 1.5, "gpu": None},
            "config": {"checkpoint": None, "model": "unet", "batch_size": 16, "input_size": 64}, "counts": {"large": 2000, "small": 200},
            "model_only": {"images_per_s": 70.0 * scale, "ratio": 1.0, "cpu_ms_per_image": 28.0, "peak_rss_mb": 900.0, "device_busy": None},
            "naive": path, "pipeline": pipeline,
            "targets": {"steady_vs_naive": 1.2 * scale, "steady_vs_model_only": 0.9 * scale, "e2e_vs_naive": 0.9 * scale}}


def test_each_figure_is_the_median_of_the_rounds_and_text_comes_from_the_first():
    rounds = [one_round(1.0), one_round(1.2), one_round(0.8)]
    res = median_of(rounds)
    assert res["targets"]["e2e_vs_naive"] == 0.9 and res["pipeline"]["steady_images_per_s"] == 60.0
    assert res["model_only"]["images_per_s"] == 70.0 and res["naive"]["steady_method"] == "difference"
    assert res["pipeline"]["startup_dashboard"] is False  # not a number: the first round's


def test_the_table_prints_every_round_and_the_median():
    rounds = [one_round(1.0), one_round(1.2), one_round(0.8)]
    res = {**median_of(rounds), "rounds": [{**r["targets"], "memory_growth": r["pipeline"]["memory_growth"]} for r in rounds]}
    text = table(res)
    assert "round 1: pipeline vs naive steady 1.20x, end-to-end 0.90x" in text
    assert "round 2: pipeline vs naive steady 1.44x, end-to-end 1.08x" in text
    assert "round 3: pipeline vs naive steady 0.96x, end-to-end 0.72x" in text
    assert "(median of 3 rounds): steady 1.20x (target >= 1.0x), end-to-end 0.90x (>= 0.85x)" in text
    assert "Ray ready (dashboard off) 6.0, first predictor ready 15.0, first batch 16.0" in text
    assert "small run, 200 images end to end: naive 10.0 s, pipeline 10.0 s (1.00x naive)" in text
