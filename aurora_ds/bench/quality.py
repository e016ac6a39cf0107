"""Does Aurora adapt a frozen backbone to a shifted task as well as full fine-tuning, and as well
as the other few-parameter methods at the same count?

A tiny BLIP (blip-tiny-retrieval) is pre-trained fully on split A of the scene task
(:mod:`.scenes`) with the retrieval objective (ITC + ITM), frozen, then adapted on split B by
every method in :data:`METHODS`: same layers (Aurora's paper targets), same batches, same steps;
every adapter also trains the projection and matching heads. Each method's learning rate is the
best of a small grid on B validation (mean over two seeds); that rate then runs on every seed and
is scored on B test. Validation and test scenes are disjoint from each other and from B training.
Metrics: TR/IR@1 and @5 by ITC similarity, and with the top-k of ITC re-ranked by the matching
head (what the project's evaluation does).
"""

import copy
import hashlib
import json
import os
import random
import statistics
import time

from . import scenes as task
from .report import cli_config, machine, table, write

BACKBONE = "blip-tiny-retrieval"
MAIN_RANK = 4
VBLORA_RANK, VBLORA_LENGTH = 2, 16
# Learning-rate grids: one for every few-parameter method, one for full fine-tuning; the sweep
# picks one rate per method on B validation.
ADAPTER_GRID, FULL_GRID = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1), (1e-4, 3e-4, 1e-3, 3e-3)
# name -> (family, options); Aurora's ablations run at MAIN_RANK. "dropout 0" runs every layer
# through the merged weight (exact there): what that path costs in learning is dropout 0's cost.
METHODS = {
    "zero-shot": ("zero", {}),
    "aurora R=2": ("aurora", {"rank": 2}),
    "aurora R=4": ("aurora", {"rank": 4}),
    "aurora R=8": ("aurora", {"rank": 8}),
    "aurora R=4 dropout 0": ("aurora", {"rank": 4, "dropout": 0.0, "merged": "on"}),
    "aurora R=4 no GQT": ("aurora", {"rank": 4, "gated_query": False}),
    "aurora R=4 no ICE": ("aurora", {"rank": 4, "context_enhancement": False}),
    "aurora R=4 private": ("aurora", {"rank": 4, "private": True}),
    "lora r=1": ("lora", {"rank": 1}),
    "vera": ("vera", {}),
    "vb-lora": ("vblora", {}),
    "full": ("full", {}),
}
SCORES = ("itc_tr1", "itc_ir1", "itc_tr5", "itc_ir5", "itm_tr1", "itm_ir1", "itm_tr5", "itm_ir5")


def add_arguments(p):
    p.add_argument("--out", required=True, help="folder for quality.json, quality.md, quality.png and the cached pre-training")
    p.add_argument("--pretrain-steps", type=int, default=3000, help="full training on split A")
    p.add_argument("--steps", type=int, default=300, help="adaptation steps on split B, per method and run")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--test-scenes", type=int, default=500, help="B test scenes (one image and caption each)")
    p.add_argument("--val-scenes", type=int, default=200, help="B validation scenes, for the learning-rate sweep")
    p.add_argument("--seeds", type=int, default=5, help="runs per method at its chosen learning rate")
    p.add_argument("--sweep-seeds", type=int, default=2, help="seeds each rate of the sweep runs on")
    p.add_argument("--lrs", type=int, default=5, help="how many rates of each grid to sweep (the middle ones)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of: " + ", ".join(METHODS))
    p.add_argument("--k-test", type=int, default=8, help="ITC candidates re-ranked by the matching head")
    p.add_argument("--lr-pretrain", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: steadiest on a shared machine)")
    p.add_argument("--quick", action="store_true",
                   help="every method and code path at the smallest settings, in seconds (the test suite's run); "
                        "its figures mean nothing")


# --quick: the sizes it overrides.
QUICK = {"pretrain_steps": 3, "steps": 2, "batch": 8, "test_scenes": 12, "val_scenes": 6, "seeds": 2, "lrs": 2}


def objective_config(lr: float, steps: int, batch: int, seed: int):
    from aurora_ds.engine.config import build_config

    # A short queue and a fast momentum encoder: with BLIP's 57,600 / 0.995 a run this short only
    # ever compares against stale random features and the tiny model collapses to constant ones.
    return build_config(overrides={"data.source": "synthetic", "engine.seed": seed, "optim.lr": lr, "optim.batch_size": batch,
                                   "optim.warmup_steps": max(1, steps // 20), "objective.queue_size": 64, "objective.momentum": 0.9})


def train(model, batches: task.Batches, steps: int, lr: float, seed: int) -> list[float]:
    """The retrieval objective on the parameters of ``model`` that require grad (plain backend,
    EMA momentum encoder over those parameters); returns the loss per step."""
    import torch

    from aurora_ds.engine.backend import PlainBackend
    from aurora_ds.engine.ema import EMA
    from aurora_ds.tasks.retrieval import RetrievalObjective

    torch.manual_seed(seed)
    cfg = objective_config(lr, steps, batches.batch, seed)
    objective = RetrievalObjective(model, cfg)
    backend = PlainBackend(objective, cfg, steps)
    objective.train()
    objective.ema = EMA(backend, [(n, p) for n, p in objective.named_parameters() if p.requires_grad], cfg.objective.momentum)
    history = []
    for step in range(steps):
        losses = objective.losses(backend.forward, batches(step), step)
        backend.backward(losses["loss"])
        backend.step()
        history.append(losses["loss"].item())
    return history


def warm_up(model, batches: task.Batches, steps: int, lr: float, seed: int) -> list[float]:
    """Plain in-batch image-text contrastive training of the whole model.

    From random init the full objective (momentum features, queue, ITM) sits on the collapsed
    plateau of near-identical features for a long time on this tiny task; a plain symmetric
    InfoNCE leaves it within ~100 steps, after which the full objective takes over.
    """
    import torch
    import torch.nn.functional as F

    from aurora_ds.tasks.retrieval import RetrievalObjective, media_index

    torch.manual_seed(seed)
    objective = RetrievalObjective(model, objective_config(lr, steps, batches.batch, seed)).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.05)
    history = []
    for step in range(steps):
        batch = batches(step)
        image, _ = objective(batch, step, "embed_media")
        text, _ = objective(batch, step, "embed_text")
        idx = media_index(batch)
        pos = (idx.view(-1, 1) == idx.view(1, -1)).float()
        targets = pos / pos.sum(1, keepdim=True)
        logits = image @ text.t() / 0.07
        loss = (-(F.log_softmax(logits, 1) * targets).sum(1).mean() - (F.log_softmax(logits.t(), 1) * targets).sum(1).mean()) / 2
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(loss.item())
    return history


def evaluate(model, data: dict, k_test: int) -> dict:
    """R@1 / R@5 both ways over ``data`` (one caption per image, distinct scenes): by ITC
    similarity, and with each query's top ``k_test`` re-ranked by the matching head."""
    import torch

    from aurora_ds.tasks.retrieval import RetrievalObjective
    from aurora_ds.tasks.retrieval_eval import retrieval_metrics

    objective = RetrievalObjective(model, objective_config(1e-4, 1, 1, 0)).eval()
    ids, mask = data["input_ids"], data["attention_mask"]
    with torch.no_grad():
        media, tokens = objective({"pixel_values": data["pixel_values"]}, 0, "embed_media")
        text, _ = objective({"input_ids": ids, "attention_mask": mask}, 0, "embed_text")
        itc = (media @ text.t()).float()
        n, k = len(media), min(k_test, len(media))
        i2t, t2i = itc.topk(k, 1).indices, itc.t().topk(k, 1).indices
        rows = torch.arange(n).repeat_interleave(k)
        pairs = torch.cat([torch.stack([rows, i2t.reshape(-1)], 1), torch.stack([t2i.reshape(-1), rows], 1)]).unique(dim=0)
        itm = torch.full((n, n), -1.0)
        for chunk in pairs.split(1024):
            img, txt = chunk[:, 0], chunk[:, 1]
            itm[img, txt] = objective({"input_ids": ids[txt], "attention_mask": mask[txt], "media_tokens": tokens[img]},
                                      0, "match").float()
    model.train()
    pairs = [[i] for i in range(n)], list(range(n))
    out = {}
    for name, score in (("itc", itc), ("itm", itm)):
        m = retrieval_metrics(score.numpy(), score.t().numpy(), *pairs)
        out.update({f"{name}_tr1": m["txt_r1"], f"{name}_ir1": m["img_r1"], f"{name}_tr5": m["txt_r5"],
                    f"{name}_ir5": m["img_r5"]})
    return out


def val_score(metrics: dict) -> float:
    """What the sweep maximises: mean R@1 by ITC, both ways (the headline metric: on this task
    the tiny matching head re-ranks above chance but below ITC, see docs/benchmarks.md)."""
    return (metrics["itc_tr1"] + metrics["itc_ir1"]) / 2


def _targets(rank: int) -> tuple[list[str], int, int]:
    from .step import aurora_targets

    return aurora_targets(BACKBONE, rank)


def _blocks(names: list[str]) -> list[str]:
    """The transformer-block prefixes of the adapted layers (``...layers.0``, ``...layer.1``)."""
    import re

    return sorted({re.match(r"(.*\.layers?\.\d+)\.", n).group(1) for n in names})


def build(method: str, pretrained, seed: int):
    """A copy of the frozen pre-trained backbone with ``method``'s trainable parameters; returns
    (model, info)."""
    import torch

    from aurora_ds import AuroraConfig, inject_aurora
    from aurora_ds.backbones import get_spec

    from .step import inject_lora, inject_vblora, inject_vera

    family, options = METHODS[method]
    model = copy.deepcopy(pretrained)
    torch.manual_seed(seed)
    names, width, target = _targets(MAIN_RANK)
    info = {}
    if family == "aurora":
        opts = dict(options)
        if opts.pop("private", False):
            opts["tower_ranks"] = {b: opts["rank"] for b in _blocks(names)}
        handle = inject_aurora(model, AuroraConfig(backbone=BACKBONE, **opts))
        info["adapter"] = handle.num_trainable()
    elif family == "lora":
        inject_lora(model, names, options["rank"])
    elif family == "vera":
        # VeRA trains a vector of its rank and one of each layer's output width: pick the rank
        # whose count is closest to Aurora's at MAIN_RANK (at least 1).
        outs = sum(model.get_submodule(n).out_features for n in names)
        info["vera_rank"] = max(1, round((target - outs) / len(names)))
        model = inject_vera(model, names, info["vera_rank"])
    elif family == "vblora":
        # VB-LoRA trains a bank of vectors and, per layer, logits over the bank for each
        # sub-vector of its rank-r factors: pick the bank size closest to Aurora's count.
        per_vector = VBLORA_RANK * width // VBLORA_LENGTH + VBLORA_LENGTH
        info["vblora_vectors"] = max(2, round(target / per_vector))
        model = inject_vblora(model, names, VBLORA_RANK, VBLORA_LENGTH, info["vblora_vectors"])
    elif family == "full":
        model.requires_grad_(True)
    if family not in ("aurora", "full", "zero"):
        info["adapter"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if family not in ("full", "zero"):
        for head in get_spec(BACKBONE).trained_heads:
            model.get_submodule(head).requires_grad_(True)
    info["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return model, info


def fit(method: str, pretrained, data: dict, lr: float, seed: int, args) -> dict:
    """One run: build, adapt on B train, score on B validation; keeps the model for the test."""
    start = time.perf_counter()
    model, info = build(method, pretrained, seed)
    losses = train(model, task.Batches(data["train"], args.batch, 1000 + seed, data["tok"], swap=True), args.steps, lr, seed)
    return {"lr": lr, "seed": seed, **info, "losses": losses, "val": evaluate(model, data["val"], args.k_test),
            "seconds": time.perf_counter() - start, "model": model}


def lr_grid(family: str, n: int) -> list[float]:
    """The ``n`` middle rates of the family's grid (all of it by default)."""
    grid = FULL_GRID if family == "full" else ADAPTER_GRID
    start = max(0, (len(grid) - n) // 2)
    return list(grid[start:start + n])


def run_method(method: str, pretrained, data: dict, args) -> dict:
    """The learning-rate sweep on the first ``--sweep-seeds`` seeds (scored on validation, mean
    over those seeds: a rate at the edge of stability that one seed survives is not chosen),
    then the chosen rate on the remaining seeds; every seed at that rate is scored on test."""
    family = METHODS[method][0]
    if family == "zero":
        model, info = build(method, pretrained, 0)
        test = evaluate(model, data["test"], args.k_test)
        return {"method": method, **info, "sweep": [], "runs": [{"seed": 0, "test": test}], **summary([test])}
    first = range(min(args.sweep_seeds, args.seeds))
    grid = {lr: [fit(method, pretrained, data, lr, seed, args) for seed in first] for lr in lr_grid(family, args.lrs)}
    score = {lr: statistics.fmean(val_score(r["val"]) for r in rs) for lr, rs in grid.items()}
    lr = max(score, key=score.get)
    runs = grid[lr] + [fit(method, pretrained, data, lr, seed, args) for seed in range(len(first), args.seeds)]
    for r in runs:
        r["test"] = evaluate(r.pop("model"), data["test"], args.k_test)
    sweep = [r for rs in grid.values() for r in rs]
    for r in sweep:
        r.pop("model", None)
    best = runs[0]
    info = {k: v for k, v in best.items() if k not in ("lr", "seed", "losses", "val", "seconds", "test")}
    row = {"method": method, **info, "lr": lr, "sweep": [{"lr": k, "val": [r["val"] for r in rs], "score": score[k]}
                                                         for k, rs in grid.items()],
           "runs": runs, "seconds": sum(r["seconds"] for r in sweep + runs[len(first):]),
           **summary([r["test"] for r in runs])}
    print(f"[quality] {method}: {row['trainable']:,} trainable, lr {best['lr']:g}, test R@1 (ITC) "
          f"TR {row['itc_tr1']['mean']:.1f}±{row['itc_tr1']['std']:.1f} IR {row['itc_ir1']['mean']:.1f}"
          f"±{row['itc_ir1']['std']:.1f}, re-ranked TR {row['itm_tr1']['mean']:.1f} IR {row['itm_ir1']['mean']:.1f} "
          f"({row['seconds']:.0f} s)", flush=True)
    return row


def summary(tests: list[dict]) -> dict:
    out = {}
    for k in SCORES + ("r1",):
        values = [val_score(t) if k == "r1" else t[k] for t in tests]
        out[k] = {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}
    return out


def pretrain(data: dict, args) -> tuple:
    """The backbone pre-trained on A, from the cache in ``--out`` when its settings match."""
    import torch
    from safetensors.torch import load_file, save_file

    from aurora_ds import build_backbone

    settings = {"steps": args.pretrain_steps, "batch": args.batch, "lr": args.lr_pretrain, "backbone": BACKBONE,
                "scenes": len(data["a"]), "task": [task.COLOURS, task.SHAPES, task.TEMPLATES, task.IMAGE_SIZE],
                "version": 3}
    tag = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    path = os.path.join(args.out, f"pretrain-{tag}")
    torch.manual_seed(0)
    model = build_backbone(BACKBONE)
    if os.path.exists(path + ".json"):
        model.load_state_dict(load_file(path + ".safetensors"))
        with open(path + ".json") as f:
            info = json.load(f)
        print(f"[quality] pre-trained backbone from {path}.safetensors", flush=True)
    else:
        start = time.perf_counter()
        batches = task.Batches(data["a"], args.batch, 0, data["tok"])
        warm = args.pretrain_steps // 3
        losses = warm_up(model, batches, warm, args.lr_pretrain, 0)
        losses += train(model, batches, args.pretrain_steps - warm, args.lr_pretrain, 0)
        info = {"settings": settings, "seconds": time.perf_counter() - start, "losses": losses,
                "a_test": evaluate(model, data["a_test"], args.k_test)}
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path + ".safetensors")
        with open(path + ".json", "w") as f:
            json.dump(info, f)
    model.requires_grad_(False)
    print(f"[quality] pre-training on A ({info['seconds']:.0f} s): A test {info['a_test']}", flush=True)
    return model, info


def prepare(args) -> dict:
    """The splits, the tokenizer and the fixed evaluation sets."""
    a, b = task.splits()
    rng = random.Random(0)
    rng.shuffle(b)
    n_eval = args.test_scenes + args.val_scenes
    if args.test_scenes < 1 or args.val_scenes < 1 or n_eval >= len(b):
        raise SystemExit(f"--test-scenes and --val-scenes must be at least 1 and leave B training scenes "
                         f"(B has {len(b)} scenes)")
    tok = task.tokenizer()
    test, val, train = b[:args.test_scenes], b[args.test_scenes:n_eval], b[n_eval:]
    sets = {name: task.make_batch(pool, random.Random(i), tok, swap=name != "a_test")
            for i, (name, pool) in enumerate((("test", test), ("val", val), ("a_test", rng.sample(a, args.test_scenes))))}
    return {"a": a, "train": train, "tok": tok, **sets,
            "keys": {"train": [task.key(s) for s in train], "val": [task.key(s) for s in val],
                     "test": [task.key(s) for s in test]}}


def recovered(rows: list[dict]) -> None:
    """Each row's share of full fine-tuning's gain over zero-shot in mean R@1 (ITC)."""
    by = {r["method"]: r for r in rows}
    if "zero-shot" in by and "full" in by:
        zero, full = by["zero-shot"]["r1"]["mean"], by["full"]["r1"]["mean"]
        for r in rows:
            r["recovered"] = (r["r1"]["mean"] - zero) / (full - zero) if full != zero else None


def markdown(results: dict) -> str:
    def ms(s):
        return f"{s['mean']:.1f} ± {s['std']:.1f}"

    rows = [[r["method"], f"{r['trainable']:,}", f"{r['lr']:g}" if "lr" in r else "–",
             *(ms(r[k]) for k in ("itc_tr1", "itc_ir1", "itc_tr5", "itc_ir5", "itm_tr1", "itm_ir1")),
             "–" if r.get("recovered") is None else f"{100 * r['recovered']:.0f} %"] for r in results["methods"]]
    c, pre, s = results["config"], results["pretrain"], results["splits"]
    head = (f"Split A pre-training: {c['pretrain_steps']} steps; A test R@1 TR/IR by ITC "
            f"{pre['a_test']['itc_tr1']:.1f}/{pre['a_test']['itc_ir1']:.1f}, re-ranked by ITM "
            f"{pre['a_test']['itm_tr1']:.1f}/{pre['a_test']['itm_ir1']:.1f}. Adaptation on B: {c['steps']} steps, "
            f"batch {c['batch']}, {s['b_train_scenes']} training scenes; learning rate chosen on {s['b_val_scenes']} "
            f"validation scenes; {c['seeds']} seeds, mean ± std on {s['b_test_scenes']} test scenes (chance R@1 "
            f"{100 / s['b_test_scenes']:.1f}); 'recovered' = share of full fine-tuning's gain in R@1 (ITC, mean of "
            f"TR and IR) over zero-shot; 're-ranked' = top {c['k_test']} of ITC re-ranked by the matching head.\n\n")
    return head + table(["method", "trainable", "lr", "TR@1", "IR@1", "TR@5", "IR@5", "TR@1 re-ranked",
                         "IR@1 re-ranked", "recovered"], rows)


def plot(path: str, rows: list[dict], title: str):
    """R@1 (mean of TR and IR) against trainable parameters, log x, std over seeds as error bars:
    by ITC, and re-ranked by the matching head."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, (label, tr, ir) in zip(axes, (("ITC", "itc_tr1", "itc_ir1"), ("re-ranked by ITM", "itm_tr1", "itm_ir1"))):
        for r in rows:
            values = [(run["test"][tr] + run["test"][ir]) / 2 for run in r["runs"]]
            mean, std = statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0
            if r["trainable"]:
                ax.errorbar(r["trainable"], mean, yerr=std, fmt="o", capsize=3, label=r["method"])
            else:
                ax.axhline(mean, color="grey", linestyle="--", label=r["method"])
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters")
        ax.set_title(f"{title}: R@1 {label}", fontsize=10)
    axes[0].set_ylabel("R@1, mean of TR and IR (%)")
    axes[1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args):
    import torch

    if args.quick:
        vars(args).update(QUICK)
    torch.set_num_threads(args.threads)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise SystemExit(f"--methods: unknown {unknown}; choose from {', '.join(METHODS)}")
    if args.seeds < 1 or args.lrs < 1 or args.sweep_seeds < 1:
        raise SystemExit("--seeds, --sweep-seeds and --lrs must be at least 1")
    os.makedirs(args.out, exist_ok=True)
    start = time.perf_counter()
    data = prepare(args)
    pretrained, pre = pretrain(data, args)
    rows = [run_method(m, pretrained, data, args) for m in methods]
    recovered(rows)
    pairs_a, pairs_b = task.combos()
    results = {"machine": machine(), "config": cli_config(args),
               "splits": {"a_pairs": pairs_a, "b_pairs": pairs_b, "a_scenes": len(data["a"]), **data["keys"],
                          "b_train_scenes": len(data["train"]), "b_val_scenes": args.val_scenes,
                          "b_test_scenes": args.test_scenes},
               "pretrain": pre, "methods": rows, "seconds": time.perf_counter() - start}
    path = os.path.join(args.out, "quality.png")
    plot(path, rows, f"B test after {args.steps} adaptation steps, {args.seeds} seeds")
    results["plots"] = [path]
    for p in write(args.out, "quality", results, markdown(results)):
        print(f"[quality] wrote {p}")
    return 0
