"""How good a run is, read from its summary: each metric of the final evaluation beside the frozen
model's (the evaluation at step 0, ``eval.at_start``) and the metric's chance level on that
evaluation set. A number means little alone: 12 test images make IR@10 83 % by chance, and a
random-init backbone scores at chance before and after a few steps. The end of every run logs
the headline rows; the demo's report.md has them all."""

from __future__ import annotations

HEADLINE = ("r_mean", "txt_r1", "img_r1", "accuracy")


def quality_rows(summary: dict) -> list[dict]:
    """One row per (split, metric) with a chance level: the frozen model's value (None without a
    step-0 evaluation), the final one (the last validation; test: the adapter reported on test),
    the step it was taken at, and chance."""
    evaluations = summary.get("evaluations") or []
    test = summary.get("test") or {}
    finals = {"val": (evaluations[-1], evaluations[-1]["step"]) if evaluations and evaluations[-1]["step"] else None,
              "test": (test["metrics"], test["step"]) if test else None}
    rows = []
    for split, found in finals.items():
        frozen = (summary.get("frozen") or {}).get(split)
        final, step = found or (None, None)
        for metric, chance in ((final or frozen or {}).get("chance") or {}).items():
            rows.append({"split": split, "metric": metric, "frozen": frozen and frozen.get(metric),
                         "final": final and final.get(metric), "step": step, "chance": chance})
    return rows


def _number(value) -> str:
    return "-" if value is None else f"{value:.1f}"


def quality_lines(summary: dict, metrics=HEADLINE) -> list[str]:
    """``split metric: frozen F, final X (step N), chance C`` for the headline metrics."""
    return [f"{r['split']} {r['metric']}: frozen {_number(r['frozen'])}, final {_number(r['final'])} (step {r['step']}), "
            f"chance {_number(r['chance'])}" for r in quality_rows(summary) if r["metric"] in metrics]


def quality_table(summary: dict) -> list[str]:
    """The rows as a markdown table."""
    lines = ["| split | metric | frozen (step 0) | final | step | chance |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['split']} | {r['metric']} | {_number(r['frozen'])} | {_number(r['final'])} | {r['step'] or '-'} | "
              f"{_number(r['chance'])} |" for r in quality_rows(summary)]
    return lines
