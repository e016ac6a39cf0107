"""What every benchmark writes under ``--out``: NAME.json (with the machine it ran on), NAME.md
(tables) and PNG plots, so figures from different machines can be told apart and compared."""

import json
import os
import platform
import resource


def machine() -> dict:
    """Enough to tell two result files' machines apart."""
    import torch

    cuda = torch.cuda.is_available()
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "cuda": torch.version.cuda if cuda else None,
    }


def current_rss_mb() -> float:
    """Resident memory now (ru_maxrss only gives the peak)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def ratio(a, b):
    """a / b, or None where either is missing or b is zero (a JSON-safe "not measurable")."""
    return None if a is None or not b else a / b


def fmt(value, spec: str = ".2f", suffix: str = "") -> str:
    return "n/a" if value is None else format(value, spec) + suffix


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write(out: str, name: str, results: dict, markdown: str) -> list[str]:
    """NAME.json and NAME.md under ``out``; returns their paths."""
    os.makedirs(out, exist_ok=True)
    paths = [os.path.join(out, f"{name}.json"), os.path.join(out, f"{name}.md")]
    with open(paths[0], "w") as f:
        json.dump(results, f, indent=2)
    with open(paths[1], "w") as f:
        f.write(markdown)
    return paths


def bar_chart(path: str, groups: list[str], series: dict[str, list], ylabel: str, title: str):
    """Grouped bars: one group per entry of ``groups``, one bar per series (None = not drawn)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(groups) * max(1, len(series)) / 3, 3.6))
    width = 0.8 / max(1, len(series))
    for k, (label, values) in enumerate(series.items()):
        xs = [g + (k - (len(series) - 1) / 2) * width for g in range(len(groups))]
        ax.bar([x for x, v in zip(xs, values) if v is not None], [v for v in values if v is not None],
               width, label=label)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cli_config(args) -> dict:
    """The command-line arguments as plain values (without argparse's ``run`` hook)."""
    return {k: v for k, v in vars(args).items() if k != "run"}
