"""The procedurally generated image-caption task of ``aurora-bench quality``.

A 32x32 image holds one group of shapes on the left and one on the right, each group one or two
shapes of one colour ("two red circles on the left and a blue triangle on the right"). Split A
(pre-training) and split B (the target) differ twice. Colour-shape bindings: A holds two of the
three shapes of every colour, and every B scene has at least one group whose colour never
appears with that shape in A. The camera: B's images have their red and blue channels swapped
(a BGR/RGB mix-up) while the captions still name the true colours, so what a model learnt on A
about colours is wrong on B and must be re-learnt, while shapes, counts and sides carry over.
(Measured: a model pre-trained on A generalises to the unseen bindings almost as well as to A
itself, and a mirrored camera changes nothing because the tiny model does not learn sides, so
neither leaves anything for adaptation to show.) B scenes are split between training,
validation and test, disjoint."""

import random

COLOURS = {"red": (220, 40, 40), "orange": (245, 140, 30), "yellow": (235, 215, 40), "green": (40, 190, 60),
           "cyan": (40, 210, 220), "blue": (50, 90, 240), "purple": (160, 60, 220), "white": (240, 240, 240)}
SHAPES = ("circle", "square", "triangle")
COUNTS = {1: "a", 2: "two"}
TEMPLATES = (
    "{l} on the left and {r} on the right",
    "{r} on the right and {l} on the left",
    "an image with {l} on the left side and {r} on the right side",
    "on the left {l}, on the right {r}",
)
IMAGE_SIZE, MAX_TOKENS = 32, 24


def combos() -> tuple[list, list]:
    """Colour-shape pairs of split A and of split B (every colour and every shape occurs in both,
    never the same pair)."""
    pairs = [(c, s, (i + j) % len(SHAPES)) for i, c in enumerate(COLOURS) for j, s in enumerate(SHAPES)]
    return [(c, s) for c, s, k in pairs if k], [(c, s) for c, s, k in pairs if not k]


def splits() -> tuple[list, list]:
    """(A scenes: both groups from A pairs, B scenes: at least one group from a B pair)."""
    pairs_a, pairs_b = combos()
    groups_a = [(n, c, s) for n in COUNTS for c, s in pairs_a]
    groups = groups_a + [(n, c, s) for n in COUNTS for c, s in pairs_b]
    a = set(groups_a)
    every = [(left, right) for left in groups for right in groups]
    return [s for s in every if set(s) <= a], [s for s in every if not set(s) <= a]


def phrase(group) -> str:
    n, colour, shape = group
    article = "an" if n == 1 and colour[0] in "aeiou" else COUNTS[n]
    return f"{article} {colour} {shape}{'s' if n > 1 else ''}"


def caption(scene, rng: random.Random) -> str:
    return rng.choice(TEMPLATES).format(l=phrase(scene[0]), r=phrase(scene[1]))


def key(scene) -> str:
    return " | ".join(phrase(g) for g in scene)


def draw(scene, rng: random.Random, swap: bool = False, size: int = IMAGE_SIZE):
    """The scene as a normalised (3, size, size) tensor, with jittered positions, sizes and
    colours; ``swap`` exchanges the red and blue channels (the captions still name the true colours)."""
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
            r = rng.randint(4, 5)
            x = side * half + rng.randint(r + 1, half - r - 2)
            y = y0 + rng.randint(-2, 2)
            fill = tuple(min(255, max(0, v + rng.randint(-25, 25))) for v in COLOURS[colour])
            draw_shape(pen, shape, fill, x, y, r)
    if swap:
        image = Image.merge("RGB", image.split()[::-1])
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (pixels - 0.5) / 0.5


def tokenizer():
    """A word-level tokenizer trained on every caption the task can produce."""
    from aurora_ds.backbones.tokenizer import train_tokenizer

    a, b = splits()
    texts = [t.format(l=phrase(s[0]), r=phrase(s[1])) for s in a[:50] + b[:50] for t in TEMPLATES]
    words = [phrase((n, c, s)) for n in COUNTS for c in COLOURS for s in SHAPES]
    return train_tokenizer(texts + words, vocab_size=256)


def make_batch(chosen, rng: random.Random, tok, swap: bool = False) -> dict:
    """Images and captions of ``chosen`` scenes; the media id is the scene, so images of the same
    scene count as positives of each other."""
    import torch

    enc = tok([caption(s, rng) for s in chosen], padding="max_length", truncation=True, max_length=MAX_TOKENS,
              return_tensors="pt")
    return {"pixel_values": torch.stack([draw(s, rng, swap) for s in chosen]), "input_ids": enc["input_ids"],
            "attention_mask": enc["attention_mask"], "media_id": [key(s) for s in chosen]}


class Batches:
    """Training batches of a scene pool; batch k depends only on (seed, k): every method sees the
    same data in the same order."""

    def __init__(self, pool, batch: int, seed: int, tok, swap: bool = False):
        self.pool, self.batch, self.seed, self.tok, self.swap = pool, batch, seed, tok, swap

    def __call__(self, step: int) -> dict:
        rng = random.Random(self.seed * 1_000_003 + step)
        return make_batch([rng.choice(self.pool) for _ in range(self.batch)], rng, self.tok, self.swap)
