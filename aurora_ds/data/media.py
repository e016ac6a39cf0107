"""Decoding images (PIL) and videos (decord) from shard bytes, frame sampling, BLIP transforms."""

import io
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2

BLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
BLIP_STD = (0.26862954, 0.26130258, 0.27577711)
FRAME_SAMPLINGS = ("uniform", "random", "headtail")
# PIL's resample codes, as preprocessor_config.json writes them.
RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}


def read_preprocessing(checkpoint) -> dict | None:
    """``{"mean", "std", "size", "resample"}`` from a checkpoint's ``preprocessor_config.json``
    (BlipImageProcessor's keys), or None when it has none."""
    path = Path(checkpoint) / "preprocessor_config.json" if checkpoint else None
    if path is None or not path.is_file():
        return None
    raw = json.loads(path.read_text())
    size = raw.get("size") or {}
    side = size.get("height") or size.get("shortest_edge") if isinstance(size, dict) else size
    resample = raw.get("resample", 3)
    if resample not in RESAMPLE:
        raise ValueError(f"{path}: resample={resample!r} is not one of {sorted(RESAMPLE)} ({RESAMPLE})")
    return {"mean": tuple(float(m) for m in raw.get("image_mean", BLIP_MEAN)),
            "std": tuple(float(s) for s in raw.get("image_std", BLIP_STD)),
            "size": int(side) if side else None, "resample": RESAMPLE[resample]}


def build_transform(image_size, train, mean=BLIP_MEAN, std=BLIP_STD, resample="bicubic"):
    """BLIP's transforms, for a uint8 image (3,H,W) or video (T,3,H,W); normalisation and
    interpolation are the checkpoint's (``read_preprocessing``), BLIP's by default.

    torchvision's v2 transforms draw one set of random parameters per call, so every frame
    of a video gets the same crop, flip and augmentation.
    """
    mode = getattr(v2.InterpolationMode, resample.upper())
    if train:
        steps = [v2.RandomResizedCrop(image_size, scale=(0.5, 1.0), interpolation=mode, antialias=True),
                 v2.RandomHorizontalFlip(),
                 v2.RandAugment(num_ops=2, magnitude=5)]
    else:
        steps = [v2.Resize((image_size, image_size), interpolation=mode, antialias=True)]
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    return v2.Compose(steps)


def decode_image(data):
    """JPEG/PNG bytes -> uint8 tensor (3,H,W). Decodes fully, so truncated files raise here."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        rgb = np.asarray(img.convert("RGB"))
    return tv_tensors.Image(torch.from_numpy(rgb.copy()).permute(2, 0, 1))


def frame_indices(num_frames, video_len, sampling, rng):
    """Which frames to decode, as in ALPRO/BLIP video loaders.

    uniform: the middle of each of ``num_frames`` equal segments; random: a random frame in
    each segment (training); headtail: half at random from the first half, half from the second.
    Short videos repeat frames so the count is always ``num_frames``.
    """
    if video_len <= 0:
        raise ValueError("video has no frames")
    if sampling == "headtail" and video_len >= 2 and num_frames >= 2:
        half = video_len // 2
        n_head = num_frames // 2
        head = sorted(rng.choices(range(half), k=n_head) if half < n_head else rng.sample(range(half), n_head))
        tail_range = range(half, video_len)
        n_tail = num_frames - n_head
        tail = sorted(rng.choices(tail_range, k=n_tail) if len(tail_range) < n_tail
                      else rng.sample(tail_range, n_tail))
        return head + tail
    edges = np.linspace(0, video_len, num_frames + 1)
    if sampling == "random":
        idx = [rng.randrange(int(a), max(int(a) + 1, int(b))) for a, b in zip(edges[:-1], edges[1:])]
    else:
        idx = [int((a + b) / 2) for a, b in zip(edges[:-1], edges[1:])]
    return [min(i, video_len - 1) for i in idx]


def decode_video(data, num_frames, sampling, rng):
    """MP4 bytes -> uint8 tensor (T,3,H,W) of sampled frames, decoded in memory by decord."""
    import decord

    reader = decord.VideoReader(io.BytesIO(data), ctx=decord.cpu(0), num_threads=1)
    idx = frame_indices(num_frames, len(reader), sampling, rng)
    frames = reader.get_batch(idx).asnumpy()
    return tv_tensors.Video(torch.from_numpy(frames).permute(0, 3, 1, 2).contiguous())
