"""Does Aurora adapt a frozen backbone to a shifted task as well as LoRA and full fine-tuning?

A procedurally generated compositional image-caption task: each 32x32 image holds one group
on the left and one on the right, each group one or two shapes of one colour ("two red
circles on the left and a blue square on the right"). Split A uses half of the colour-shape
combinations, split B only the other half, so B's captions and images pair colours with
shapes never seen together in A. A tiny BLIP (blip-tiny-retrieval) is pre-trained fully on A
with the retrieval objective (ITC + ITM), frozen, then adapted on B by Aurora, by LoRA at the
closest parameter count on the same layers (both also train the projection and matching
heads) and by full fine-tuning: same seed, steps and batches. Scenes of the B test set never
occur in B training. Metrics: TR@1 / IR@1 with every pair scored by the matching head (what
the project's evaluation does when k_test covers the test set), and with ITC similarity alone.
"""

import copy
import os
import random
import time

from .report import bar_chart, cli_config, machine, table, write

COLOURS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 90, 240), "yellow": (235, 215, 40)}
SHAPES = ("circle", "square", "triangle")
COUNTS = {1: "a", 2: "two"}
TEMPLATES = (
    "{l} on the left and {r} on the right",
    "{r} on the right and {l} on the left",
    "an image with {l} on the left side and {r} on the right side",
    "on the left {l}, on the right {r}",
)
BACKBONE, RANK = "blip-tiny-retrieval", 4
METHODS = ("zero-shot", "aurora", "lora", "full")


def add_arguments(p):
    p.add_argument("--out", required=True, help="folder for quality.json, quality.md and quality.png")
    p.add_argument("--pretrain-steps", type=int, default=600, help="full training on split A")
    p.add_argument("--steps", type=int, default=100, help="adaptation steps on split B, per method")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--test-scenes", type=int, default=48, help="held-out B scenes (one image and caption each)")
    p.add_argument("--lr-pretrain", type=float, default=1e-3)
    p.add_argument("--lr-adapter", type=float, default=2e-3, help="Aurora and LoRA")
    p.add_argument("--lr-full", type=float, default=2e-4)
    p.add_argument("--seed", type=int, default=0)


def combos() -> tuple[list, list]:
    """Colour-shape pairs of split A and of split B (a checkerboard: each colour and each shape
    occurs in both, never the same pair)."""
    pairs = [(c, s, (i + j) % 2) for i, c in enumerate(COLOURS) for j, s in enumerate(SHAPES)]
    return [(c, s) for c, s, k in pairs if k == 0], [(c, s) for c, s, k in pairs if k == 1]


def scenes(pairs) -> list[tuple]:
    groups = [(n, c, s) for n in COUNTS for c, s in pairs]
    return [(left, right) for left in groups for right in groups]


def phrase(group) -> str:
    n, colour, shape = group
    return f"{COUNTS[n]} {colour} {shape}{'s' if n > 1 else ''}"


def caption(scene, rng: random.Random) -> str:
    return rng.choice(TEMPLATES).format(l=phrase(scene[0]), r=phrase(scene[1]))


def draw(scene, rng: random.Random, size: int = 32):
    """The scene as a normalised (3, size, size) tensor, with jittered positions, sizes and colours."""
    import numpy as np
    import torch
    from PIL import Image, ImageDraw

    from shard_tools.sample import draw_shape

    grey = rng.randint(0, 60)
    image = Image.new("RGB", (size, size), (grey, grey, grey))
    pen = ImageDraw.Draw(image)
    half = size // 2
    for side, (n, colour, shape) in enumerate(scene):
        rows = [half] if n == 1 else [size // 4, 3 * size // 4]
        for y0 in rows:
            r = rng.randint(2, 3)
            x = side * half + rng.randint(r + 1, half - r - 2)
            y = y0 + rng.randint(-2, 2)
            fill = tuple(min(255, max(0, v + rng.randint(-25, 25))) for v in COLOURS[colour])
            draw_shape(pen, shape, fill, x, y, r)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (pixels - 0.5) / 0.5


def key(scene) -> str:
    return " | ".join(phrase(g) for g in scene)


def make_batch(chosen, rng: random.Random, tokenizer) -> dict:
    """Images and captions of ``chosen`` scenes; the media id is the scene, so images of the same
    scene count as positives of each other."""
    import torch

    enc = tokenizer([caption(s, rng) for s in chosen], padding="max_length", truncation=True, max_length=24,
                    return_tensors="pt")
    return {"pixel_values": torch.stack([draw(s, rng) for s in chosen]), "input_ids": enc["input_ids"],
            "attention_mask": enc["attention_mask"], "media_id": [key(s) for s in chosen]}


class Batches:
    """Training batches of a scene pool; batch k depends only on (seed, k): every method sees the
    same data in the same order."""

    def __init__(self, pool, batch: int, seed: int, tokenizer):
        self.pool, self.batch, self.seed, self.tokenizer = pool, batch, seed, tokenizer

    def __call__(self, step: int) -> dict:
        rng = random.Random(self.seed * 1_000_003 + step)
        return make_batch([rng.choice(self.pool) for _ in range(self.batch)], rng, self.tokenizer)


def objective_config(lr: float, steps: int, batch: int, seed: int):
    from aurora_ds.engine.config import build_config

    # A short queue and a fast momentum encoder: with BLIP's 57,600 / 0.995 a run this short only
    # ever compares against stale random features and the tiny model collapses to constant ones.
    return build_config(overrides={"data.source": "synthetic", "engine.seed": seed, "optim.lr": lr, "optim.batch_size": batch,
                                   "optim.warmup_steps": max(1, steps // 20), "objective.queue_size": 64, "objective.momentum": 0.9})


def train(model, batches: Batches, steps: int, lr: float, seed: int) -> list[float]:
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


def warm_up(model, batches: Batches, steps: int, lr: float, seed: int) -> list[float]:
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
        idx = media_index(batch["media_id"])
        pos = (idx.view(-1, 1) == idx.view(1, -1)).float()
        targets = pos / pos.sum(1, keepdim=True)
        logits = image @ text.t() / 0.07
        loss = (-(F.log_softmax(logits, 1) * targets).sum(1).mean() - (F.log_softmax(logits.t(), 1) * targets).sum(1).mean()) / 2
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(loss.item())
    return history


def evaluate(model, test: dict) -> dict:
    """TR@1 / IR@1 (and @5) over the test images and their captions, scored by ITM and by ITC."""
    import torch

    from aurora_ds.engine.backend import to_device
    from aurora_ds.tasks.retrieval import RetrievalObjective
    from aurora_ds.tasks.retrieval_eval import retrieval_metrics

    objective = RetrievalObjective(model, objective_config(1e-4, 1, 1, 0)).eval()
    device = next(model.parameters()).device
    test = to_device(test, device)
    with torch.no_grad():
        media, tokens = objective({"pixel_values": test["pixel_values"]}, 0, "embed_media")
        text, _ = objective({"input_ids": test["input_ids"], "attention_mask": test["attention_mask"]}, 0, "embed_text")
        n = len(media)
        itm = torch.stack([objective({"input_ids": test["input_ids"], "attention_mask": test["attention_mask"],
                                      "media_tokens": tokens[i].expand(n, *tokens.shape[1:])},
                                     0, "match") for i in range(n)]).float().cpu()
        itc = (media @ text.t()).float().cpu()
    model.train()
    pairs = [[i] for i in range(n)], list(range(n))
    out = {}
    for name, score in (("itm", itm), ("itc", itc)):
        m = retrieval_metrics(score.numpy(), score.t().numpy(), *pairs)
        out.update({f"{name}_tr1": m["txt_r1"], f"{name}_ir1": m["img_r1"], f"{name}_tr5": m["txt_r5"],
                    f"{name}_ir5": m["img_r5"]})
    return out


def adapt(method: str, pretrained, batches: Batches, args) -> tuple:
    """A copy of the frozen pre-trained backbone adapted by ``method``; (model, trainable, info, losses)."""
    import torch

    from aurora_ds import AuroraConfig, inject_aurora
    from aurora_ds.backbones import get_spec

    from .step import aurora_targets, inject_lora, matched_lora_rank

    model = copy.deepcopy(pretrained)
    heads = list(get_spec(BACKBONE).trained_heads)
    torch.manual_seed(args.seed)
    info = {}
    if method == "aurora":
        handle = inject_aurora(model, AuroraConfig(rank=RANK, backbone=BACKBONE))
        info["adapter_params"] = handle.num_trainable()
        handle.train_modules(heads)
    elif method == "lora":
        names, width, aurora_count = aurora_targets(BACKBONE, RANK)
        info["lora_rank"] = matched_lora_rank(aurora_count, width)
        inject_lora(model, names, info["lora_rank"])
        info["adapter_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        for head in heads:
            model.get_submodule(head).requires_grad_(True)
    else:
        model.requires_grad_(True)
    lr = args.lr_full if method == "full" else args.lr_adapter
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    losses = train(model, batches, args.steps, lr, args.seed)
    return model, trainable, {**info, "lr": lr}, losses


def markdown(results: dict) -> str:
    rows = [[r["method"] + (f" (r={r['lora_rank']})" if "lora_rank" in r else ""), f"{r['trainable']:,}",
             f"{r['itm_tr1']:.1f}", f"{r['itm_ir1']:.1f}", f"{r['itc_tr1']:.1f}", f"{r['itc_ir1']:.1f}",
             f"{r['seconds']:.0f}"] for r in results["methods"]]
    c, pre = results["config"], results["pretrain"]
    head = (f"Split A pre-training: {c['pretrain_steps']} steps, in-distribution A test TR@1/IR@1 (ITM) "
            f"{pre['a_test']['itm_tr1']:.1f}/{pre['a_test']['itm_ir1']:.1f}. Adaptation on split B: {c['steps']} steps, "
            f"batch {c['batch']}, seed {c['seed']}; B test: {c['test_scenes']} unseen scenes (chance R@1 "
            f"{100 / c['test_scenes']:.1f}).\n\n")
    return head + table(["method", "trainable", "TR@1 (ITM)", "IR@1 (ITM)", "TR@1 (ITC)", "IR@1 (ITC)",
                         "train s"], rows)


def run(args):
    import torch

    from aurora_ds import build_backbone
    from aurora_ds.backbones.tokenizer import train_tokenizer

    os.makedirs(args.out, exist_ok=True)
    pairs_a, pairs_b = combos()
    scenes_a, scenes_b = scenes(pairs_a), scenes(pairs_b)
    rng = random.Random(args.seed)
    rng.shuffle(scenes_b)
    if not 0 < args.test_scenes < len(scenes_b):
        raise SystemExit(f"--test-scenes must be between 1 and {len(scenes_b) - 1}")
    test_b, train_b = scenes_b[:args.test_scenes], scenes_b[args.test_scenes:]
    test_a = rng.sample(scenes_a, args.test_scenes)
    texts = [caption(s, random.Random(i)) for i, s in enumerate(scenes_a + scenes_b) for _ in range(2)]
    tokenizer = train_tokenizer(texts + [t.format(l="", r="") for t in TEMPLATES], vocab_size=256)
    test_sets = {name: make_batch(pool, random.Random(args.seed + 1), tokenizer)
                 for name, pool in (("a_test", test_a), ("b_test", test_b))}

    torch.manual_seed(args.seed)
    start = time.perf_counter()
    pretrained = build_backbone(BACKBONE)
    batches_a = Batches(scenes_a, args.batch, args.seed, tokenizer)
    warm = args.pretrain_steps // 2
    pre_losses = warm_up(pretrained, batches_a, warm, args.lr_pretrain, args.seed)
    pre_losses += train(pretrained, batches_a, args.pretrain_steps - warm, args.lr_pretrain, args.seed)
    pretrained.requires_grad_(False)
    pretrain = {"seconds": time.perf_counter() - start, "losses": pre_losses,
                **{name: evaluate(pretrained, test) for name, test in test_sets.items()}}
    print(f"[quality] pre-trained on A in {pretrain['seconds']:.0f} s: A test {pretrain['a_test']}", flush=True)

    rows = [{"method": "zero-shot", "trainable": 0, "seconds": 0.0, **pretrain["b_test"]}]
    batches_b = Batches(train_b, args.batch, args.seed + 7, tokenizer)
    for method in METHODS[1:]:
        start = time.perf_counter()
        model, trainable, info, losses = adapt(method, pretrained, batches_b, args)
        rows.append({"method": method, "trainable": trainable, "seconds": time.perf_counter() - start, **info,
                     **evaluate(model, test_sets["b_test"]), "losses": losses})
        print(f"[quality] {method}: {trainable:,} trainable, B test TR@1 {rows[-1]['itm_tr1']:.1f} "
              f"IR@1 {rows[-1]['itm_ir1']:.1f}", flush=True)

    results = {"machine": machine(), "config": cli_config(args),
               "splits": {"a_pairs": pairs_a, "b_pairs": pairs_b, "a_scenes": len(scenes_a),
                          "b_train_scenes": len(train_b), "b_test_scenes": len(test_b)},
               "pretrain": pretrain, "methods": rows}
    path = os.path.join(args.out, "quality.png")
    bar_chart(path, [r["method"] for r in rows], {k: [r[f"itm_{k.lower().replace('@', '')}"] for r in rows]
                                                  for k in ("TR@1", "IR@1")},
              "recall@1 (%)", f"split B test after {args.steps} adaptation steps")
    results["plots"] = [path]
    for p in write(args.out, "quality", results, markdown(results)):
        print(f"[quality] wrote {p}")
    return 0
