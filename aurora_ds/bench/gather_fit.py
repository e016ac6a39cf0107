"""aurora-plan's ZeRO-3 communication constants, fitted to measured runs and checked by leaving
each run out.

Each ``aurora-bench zero`` report with a 2-rank ``replicated`` and a 2-rank ``zero3`` run holds one
measured gather time per step: the ZeRO-3 step minus the replicated step (the same compute, no
gathers). aurora-plan models it (``plan.layout_estimates``) as

    module calls x overhead  +  collectives x latency  +  bytes received / bandwidth
                             +  GB of parameters the calls touch x module bytes cost

with the counts taken from the run's backbone, Aurora rank and persistence threshold (the bytes
and collectives include DeepSpeed's re-gather of the persistent tensors after each step). The
four constants are fitted to all reports by least squares of the relative errors, none
negative. The check: every report is predicted once more with the constants fitted to the
*other* reports; that error is what the model would make on a configuration it has not seen. The reports should differ in what they
stress (small against large modules, a persistence threshold that keeps the large tensors whole)
or the constants are not told apart.
"""

import itertools
import json
from pathlib import Path

import torch

from .report import fmt, machine, ratio, table, write

TERMS = ("module_overhead_s", "latency_s", "seconds_per_gbyte", "module_bytes_cost")


def add_arguments(p):
    p.add_argument("--out", required=True, help="folder for gather_fit.json and gather_fit.md")
    p.add_argument("reports", nargs="+", metavar="ZERO.json",
                   help="aurora-bench zero reports, each with 2-replicated and 2 in its --runs")


def columns(config: dict) -> list[float]:
    """The model's four terms for one run at unit constants: module calls, collectives, GB
    received (ZeRO-3 minus replicated, 2 ranks on one node) and GB of parameters called, exactly
    as aurora-plan counts them."""
    from aurora_ds.plan import count_parameters, layout_estimates

    counts = count_parameters(config["backbone"], config["rank"], config["persistence_threshold"])
    terms = dict(module_overhead=0.0, latency=0.0, intra_bw=float("inf"), module_bytes_cost=0.0)

    def extra(**unit) -> float:
        est = layout_estimates(counts, 2, 2, config["precision"], batch=config["batch"], tflops=1e12, **{**terms, **unit})
        return est["zero3"]["comm_s"] - est["replicated"]["comm_s"]

    return [extra(module_overhead=1.0), extra(latency=1.0), extra(intra_bw=1.0), extra(module_bytes_cost=1.0)]


def fit(rows: list[list[float]], targets: list[float]) -> list[float]:
    """Least squares of the *relative* errors (a tiny backbone's 0.4 s counts as much as a large
    one's 15 s), every coefficient >= 0: the best of the fits over subsets of the terms whose
    coefficients all come out non-negative."""
    best, best_error = [0.0] * len(rows[0]), float(len(targets))
    for k in range(1, len(rows[0]) + 1):
        for subset in itertools.combinations(range(len(rows[0])), k):
            a = torch.tensor([[r[j] / t for j in subset] for r, t in zip(rows, targets)], dtype=torch.float64)
            b = torch.ones(len(targets), 1, dtype=torch.float64)
            coef = torch.linalg.lstsq(a, b, driver="gelsd").solution.squeeze(1)
            if (coef < 0).any():
                continue
            error = float(((a @ coef.unsqueeze(1) - b) ** 2).sum())
            if error < best_error:
                best, best_error = [0.0] * len(rows[0]), error
                for j, c in zip(subset, coef.tolist()):
                    best[j] = c
    return best


def predict(coef: list[float], row: list[float]) -> float:
    return sum(c * x for c, x in zip(coef, row))


def load(path: str) -> dict:
    report = json.loads(Path(path).read_text())
    runs = {r["ds_config"]: r for r in report["runs"] if r["processes"] == 2}
    if not {"replicated", "zero3"} <= set(runs):
        raise SystemExit(f"{path}: needs a 2-rank replicated and a 2-rank zero3 run (aurora-bench zero --runs 2-replicated,2)")
    measured = runs["zero3"]["step_s"] - runs["replicated"]["step_s"]
    if measured <= 0:
        raise SystemExit(f"{path}: the ZeRO-3 step was not slower than the replicated one ({measured:+.3f} s): "
                         "no gather time to fit (a loaded machine? measure again)")
    config = dict(report["config"])
    config["rank"] = config.get("rank") or (4 if "tiny" in config["backbone"] else 32)
    return {"report": str(path), "config": {k: config[k] for k in ("backbone", "rank", "persistence_threshold",
                                                                 "precision", "batch", "image_size")},
            "measured_gather_s": measured,
            "replicated_step_s": runs["replicated"]["step_s"],
            "load_average": [runs["replicated"].get("load_average"), runs["zero3"].get("load_average")]}


def run(args):
    runs = [load(p) for p in args.reports]
    if len(runs) < 2:
        raise SystemExit("give at least two reports: each is checked against a fit to the others")
    rows = [columns(r["config"]) for r in runs]
    targets = [r["measured_gather_s"] for r in runs]
    coef = fit(rows, targets)
    for i, (r, row) in enumerate(zip(runs, rows)):
        others = fit(rows[:i] + rows[i + 1:], targets[:i] + targets[i + 1:])
        r.update(module_calls=row[0], collectives=row[1], gbytes_received=row[2], gbytes_called=row[3],
                 fitted_s=predict(coef, row), fitted_error=ratio(predict(coef, row) - r["measured_gather_s"], r["measured_gather_s"]),
                 left_out_constants=dict(zip(TERMS, others)), left_out_s=predict(others, row),
                 left_out_error=ratio(predict(others, row) - r["measured_gather_s"], r["measured_gather_s"]))
    constants = dict(zip(TERMS, coef))
    results = {"machine": machine(), "constants": constants, "runs": runs,
               "worst_left_out_error": max(abs(r["left_out_error"]) for r in runs),
               "aurora_plan_arguments": plan_arguments(constants)}
    for p in write(args.out, "gather_fit", results, markdown(results)):
        print(f"[gather-fit] wrote {p}")
    return 0


def plan_arguments(constants: dict) -> str:
    """The fitted constants as aurora-plan options (one node: the bandwidth is --intra)."""
    bandwidth = 1 / constants["seconds_per_gbyte"] if constants["seconds_per_gbyte"] else float("inf")
    return (f"--module-overhead {constants['module_overhead_s'] * 1e6:.0f} --gather-latency {constants['latency_s'] * 1e6:.0f} "
            f"--intra {bandwidth:.3g} --module-bytes-cost {constants['module_bytes_cost']:.3g}")


def markdown(results: dict) -> str:
    c = results["constants"]
    rows = [[f"{r['config']['backbone']}, threshold {r['config']['persistence_threshold']:,}"
             + (f", {r['config']['image_size']} px" if r["config"]["image_size"] else ""),
             f"{r['module_calls']:,.0f}", f"{r['collectives']:,.0f}", f"{r['gbytes_received']:.3f}",
             f"{r['gbytes_called']:.2f}", f"{r['replicated_step_s']:.3f}", f"{r['measured_gather_s']:.3f}", f"{r['fitted_s']:.3f} ({fmt(r['fitted_error'], '+.0%')})",
             f"{r['left_out_s']:.3f} ({fmt(r['left_out_error'], '+.0%')})"] for r in results["runs"]]
    text = table(["run (2 ranks)", "module calls", "collectives", "GB received", "GB called", "replicated step s",
                  "measured gather s/step",
                  "fitted to all", "fitted to the others"], rows)
    text += (f"\nConstants fitted to all: {c['module_overhead_s'] * 1e3:.3f} ms per module call, "
             f"{c['latency_s'] * 1e3:.3f} ms per collective, {c['seconds_per_gbyte']:.2f} s per GB received, "
             f"{c['module_bytes_cost']:.2f} s per GB of parameters called; "
             f"as aurora-plan options: `{results['aurora_plan_arguments']}`. Worst error with the run left out of the "
             f"fit: {results['worst_left_out_error']:.0%}.\n")
    return text
