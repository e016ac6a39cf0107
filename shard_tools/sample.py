"""Small synthetic datasets in the official layouts, for tests and demos.

Images are drawn scenes of coloured shapes and videos show one shape moving, so every caption,
question and answer describes what is actually in the pixels. Everything is derived from the
seed; nothing is downloaded.
"""

import csv
import io
import json
import os
import random

import av
import numpy as np
from PIL import Image, ImageDraw

COLORS = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (30, 70, 220),
    "yellow": (240, 210, 30),
    "purple": (140, 50, 170),
    "orange": (245, 140, 20),
}
BACKGROUNDS = {"white": (250, 250, 250), "black": (10, 10, 10), "grey": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle")
IMAGE_SIZE = 128
VIDEO_SIZE = 96
VIDEO_FPS = 8
VIDEO_FRAMES = 12
# Where a shape sits (centre as a fraction of the image side) and how a sentence says it.
PLACES = {
    "left": ((0.27, 0.5), "on the left"),
    "right": ((0.73, 0.5), "on the right"),
    "top": ((0.5, 0.27), "at the top"),
    "bottom": ((0.5, 0.73), "at the bottom"),
    "center": ((0.5, 0.5), "in the middle"),
}


def draw_shape(draw, shape, color, cx, cy, radius):
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    if shape == "circle":
        draw.ellipse(box, fill=color)
    elif shape == "square":
        draw.rectangle(box, fill=color)
    else:
        draw.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=color)


def random_scene(rng):
    """One or two shapes with distinct colours and places on a plain background."""
    n = rng.choice((1, 2))
    places = ["center"] if n == 1 else rng.choice((["left", "right"], ["top", "bottom"]))
    colors = rng.sample(sorted(COLORS), n)
    objects = [
        {"shape": rng.choice(SHAPES), "color": c, "place": p, "size": rng.choice(("small", "large"))}
        for c, p in zip(colors, places)
    ]
    return {"background": rng.choice(sorted(BACKGROUNDS)), "objects": objects}


def draw_scene(scene, size=IMAGE_SIZE):
    """Render a scene from random_scene as an RGB PIL image."""
    img = Image.new("RGB", (size, size), BACKGROUNDS[scene["background"]])
    draw = ImageDraw.Draw(img)
    for obj in scene["objects"]:
        (fx, fy), _ = PLACES[obj["place"]]
        radius = size * (0.1 if obj["size"] == "small" else 0.18)
        draw_shape(draw, obj["shape"], COLORS[obj["color"]], fx * size, fy * size, radius)
    return img


def scene_captions(scene, rng, n=5):
    """n distinct natural sentences, each true of the scene."""
    bg = scene["background"]
    objs = scene["objects"]
    if len(objs) == 1:
        o = objs[0]
        s, c, z = o["shape"], o["color"], o["size"]
        options = [
            f"A {z} {c} {s} on a {bg} background.",
            f"There is a {c} {s} in the middle of the picture.",
            f"A picture showing a single {c} {s}.",
            f"The {bg} image contains one {z} {c} {s}.",
            f"A {s} coloured {c} sits in the centre of a {bg} frame.",
            f"Only one shape is visible: a {c} {s}.",
            f"A plain {bg} background with a {c} {s} on it.",
        ]
    else:
        a, b = objs
        a_desc, b_desc = f"{a['color']} {a['shape']}", f"{b['color']} {b['shape']}"
        relation = "to the left of" if a["place"] == "left" else "above"
        options = [
            f"A {a_desc} and a {b_desc} on a {bg} background.",
            f"A {a_desc} {relation} a {b_desc}.",
            f"Two shapes: a {a['size']} {a_desc} and a {b['size']} {b_desc}.",
            f"The {bg} picture shows a {b_desc} and a {a_desc}.",
            f"There is a {a_desc} {PLACES[a['place']][1]} and a {b_desc} {PLACES[b['place']][1]}.",
            f"A {b_desc} next to a {a_desc} on {bg}.",
            f"Two coloured shapes, {a['color']} and {b['color']}, on a {bg} background.",
        ]
    return rng.sample(options, n)


def scene_questions(scene, rng):
    """VQA-style (question, answer) pairs that the scene answers."""
    objs = scene["objects"]
    first = objs[0]
    missing = [s for s in SHAPES if s not in {o["shape"] for o in objs}]
    asked = rng.choice(missing + [first["shape"]])
    return [
        (f"What color is the {first['shape']}?", first["color"]),
        ("How many shapes are there?", str(len(objs))),
        (f"Is there a {asked}?", "yes" if asked not in missing else "no"),
        ("What color is the background?", scene["background"]),
    ][: rng.choice((2, 3, 4))]


def human_answers(answer, rng, n=10):
    """Ten annotator answers as VQAv2 has them: mostly the right one, sometimes a variant."""
    variants = {"yes": "yep", "no": "nope", "grey": "gray", "2": "two", "1": "one"}
    return [variants.get(answer, answer) if rng.random() < 0.15 else answer for _ in range(n)]


def encode_jpeg(img):
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def random_motion(rng):
    """A shape crossing the frame in one of four directions."""
    start, end = rng.choice((("left", "right"), ("right", "left"), ("top", "bottom"), ("bottom", "top")))
    return {
        "shape": rng.choice(SHAPES),
        "color": rng.choice(sorted(COLORS)),
        "background": rng.choice(sorted(BACKGROUNDS)),
        "start": start,
        "end": end,
    }


def encode_motion_mp4(motion, size=VIDEO_SIZE, frames=VIDEO_FRAMES, fps=VIDEO_FPS):
    """H.264 MP4 bytes of the motion, written with PyAV in memory."""
    (x0, y0), _ = PLACES[motion["start"]]
    (x1, y1), _ = PLACES[motion["end"]]
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.codec_context.options = {"threads": "1"}
        for i in range(frames):
            t = i / (frames - 1)
            img = Image.new("RGB", (size, size), BACKGROUNDS[motion["background"]])
            cx = (x0 + (x1 - x0) * t) * size
            cy = (y0 + (y1 - y0) * t) * size
            draw_shape(ImageDraw.Draw(img), motion["shape"], COLORS[motion["color"]], cx, cy, size * 0.15)
            frame = av.VideoFrame.from_ndarray(np.asarray(img), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def motion_captions(motion, rng, n):
    s, c, bg = motion["shape"], motion["color"], motion["background"]
    a, b = motion["start"], motion["end"]
    options = [
        f"A {c} {s} moves from the {a} to the {b}.",
        f"A {c} {s} slides across a {bg} screen.",
        f"Animation of a {s} travelling towards the {b}.",
        f"A {c} shape crosses the frame from {a} to {b}.",
        f"On a {bg} background a {s} in {c} glides along.",
        f"The video shows a moving {c} {s}.",
        f"Something {c} moves towards the {b} of the screen.",
        f"A simple clip of a {s} moving on {bg}.",
    ]
    return rng.sample(options, n)


def motion_questions(motion):
    return [
        ("what color is the moving shape?", motion["color"]),
        ("what shape is moving?", motion["shape"]),
        ("where does the shape move to?", motion["end"]),
        ("what color is the background?", motion["background"]),
    ]


def _write(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def _write_json(path, obj):
    _write(path, json.dumps(obj, indent=1).encode("utf-8"))


def _split_names(n, fractions):
    """Assign split names to n items in order; every split gets at least one item when n allows."""
    counts = [max(1, round(n * f)) for _, f in fractions]
    counts[0] = n - sum(counts[1:])
    if counts[0] < 1:
        raise ValueError(f"need at least {len(fractions)} items, got {n}")
    return [name for (name, _), c in zip(fractions, counts) for _ in range(c)]


def _karpathy_images(entries, dataset):
    """Karpathy's dataset_{coco,flickr30k}.json from (split, filepath, filename, id, captions)."""
    images, sent_id = [], 0
    for imgid, (split, filepath, filename, source_id, captions) in enumerate(entries):
        sentences = []
        for cap in captions:
            tokens = cap.lower().rstrip(".").replace(",", "").split()
            sentences.append({"tokens": tokens, "raw": cap, "imgid": imgid, "sentid": sent_id})
            sent_id += 1
        image = {
            "filename": filename,
            "imgid": imgid,
            "split": split,
            "sentences": sentences,
            "sentids": [s["sentid"] for s in sentences],
        }
        if dataset == "coco":
            image["filepath"] = filepath
            image["cocoid"] = source_id
        images.append(image)
    return {"images": images, "dataset": dataset}


def _blip_files(entries):
    """BLIP's karpathy train (one entry per caption) and val/test (captions as lists) files."""
    files = {"train": [], "val": [], "test": []}
    for split, image, image_id, captions in entries:
        if split == "train":
            files["train"] += [{"caption": c, "image": image, "image_id": image_id} for c in captions]
        else:
            files[split].append({"image": image, "caption": captions})
    return files


def make_coco(out_dir, n, seed=0):
    """COCO in the Karpathy split: images under train2014/ and val2014/, annotations/ with BLIP's
    coco_karpathy_{train,val,test}.json and Karpathy's dataset_coco.json."""
    rng = random.Random(seed)
    ids = rng.sample(range(1, 600000), n)
    splits = _split_names(n, [("train", 0.6), ("val", 0.2), ("test", 0.2)])
    blip, karpathy = [], []
    for i, (image_id, split) in enumerate(zip(ids, splits)):
        folder = "train2014" if split == "train" and i % 2 == 0 else "val2014"
        karpathy_split = "restval" if split == "train" and folder == "val2014" else split
        filename = f"COCO_{folder}_{image_id:012d}.jpg"
        scene = random_scene(rng)
        _write(os.path.join(out_dir, folder, filename), encode_jpeg(draw_scene(scene)))
        captions = scene_captions(scene, rng)
        blip.append((split, f"{folder}/{filename}", f"coco_{image_id}", captions))
        karpathy.append((karpathy_split, folder, filename, image_id, captions))
    for split, entries in _blip_files(blip).items():
        _write_json(os.path.join(out_dir, "annotations", f"coco_karpathy_{split}.json"), entries)
    _write_json(os.path.join(out_dir, "annotations", "dataset_coco.json"), _karpathy_images(karpathy, "coco"))
    return out_dir


def make_flickr(out_dir, n, seed=0):
    """Flickr30k in the Karpathy split: flickr30k-images/{id}.jpg, annotations/ with BLIP's
    flickr30k_{train,val,test}.json and Karpathy's dataset_flickr30k.json (file names only)."""
    rng = random.Random(seed)
    ids = rng.sample(range(10**9, 10**10), n)
    splits = _split_names(n, [("train", 0.6), ("val", 0.2), ("test", 0.2)])
    blip, karpathy = [], []
    for photo_id, split in zip(ids, splits):
        filename = f"{photo_id}.jpg"
        scene = random_scene(rng)
        _write(os.path.join(out_dir, "flickr30k-images", filename), encode_jpeg(draw_scene(scene)))
        captions = scene_captions(scene, rng)
        blip.append((split, f"flickr30k-images/{filename}", str(photo_id), captions))
        karpathy.append((split, "", filename, photo_id, captions))
    for split, entries in _blip_files(blip).items():
        _write_json(os.path.join(out_dir, "annotations", f"flickr30k_{split}.json"), entries)
    _write_json(
        os.path.join(out_dir, "annotations", "dataset_flickr30k.json"), _karpathy_images(karpathy, "flickr30k")
    )
    return out_dir


def _write_videos(out_dir, n, rng, folder):
    motions = []
    for i in range(n):
        motion = random_motion(rng)
        _write(os.path.join(out_dir, folder, f"video{i}.mp4"), encode_motion_mp4(motion))
        motions.append(motion)
    return motions


def make_msrvtt(out_dir, n, seed=0):
    """MSRVTT: videos/all/video{i}.mp4, annotations/MSRVTT_data.json (20 captions per video in the
    full release, 5 here), the 1k-A test list MSRVTT_JSFUSION_test.csv and a txt_db train.jsonl."""
    rng = random.Random(seed)
    motions = _write_videos(out_dir, n, rng, os.path.join("videos", "all"))
    splits = _split_names(n, [("train", 0.6), ("validate", 0.1), ("test", 0.3)])
    videos, sentences, test_rows, train_lines = [], [], [], []
    for i, (motion, split) in enumerate(zip(motions, splits)):
        vid = f"video{i}"
        videos.append({"category": 0, "url": f"https://example.invalid/{vid}", "video_id": vid,
                       "start time": 0.0, "end time": 1.5, "split": split, "id": i})
        captions = motion_captions(motion, rng, 5)
        for cap in captions:
            sentences.append({"caption": cap, "video_id": vid, "sen_id": len(sentences)})
        if split == "test":
            test_rows.append([len(test_rows), f"ret{len(test_rows)}", f"msr{i}", vid, captions[0]])
        else:
            train_lines += [{"caption": cap, "clip_name": vid, "retrieval_key": f"ret{i}"} for cap in captions]
    ann = os.path.join(out_dir, "annotations")
    _write_json(os.path.join(ann, "MSRVTT_data.json"), {"info": {}, "videos": videos, "sentences": sentences})
    os.makedirs(ann, exist_ok=True)
    with open(os.path.join(ann, "MSRVTT_JSFUSION_test.csv"), "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["", "key", "vid_key", "video_id", "sentence"])
        writer.writerows(test_rows)
    _write(os.path.join(ann, "train.jsonl"), "".join(json.dumps(x) + "\n" for x in train_lines).encode("utf-8"))
    return out_dir


def make_didemo(out_dir, n, seed=0):
    """DiDeMo: videos/{flickr name}.mp4 and annotations/{train,val,test}_data.json, several moment
    descriptions per video whose "video" names the original .mov (converted to .mp4 on disk)."""
    rng = random.Random(seed)
    splits = _split_names(n, [("train", 0.6), ("val", 0.2), ("test", 0.2)])
    files = {"train": [], "val": [], "test": []}
    for split in splits:
        name = f"{rng.randrange(10**7, 10**8)}@N0{rng.randrange(10)}_{rng.randrange(10**9, 10**10)}_{rng.getrandbits(40):010x}"
        motion = random_motion(rng)
        _write(os.path.join(out_dir, "videos", f"{name}.mp4"), encode_motion_mp4(motion))
        moments = sorted(rng.sample(range(6), rng.choice((2, 3, 4))))
        for moment, caption in zip(moments, motion_captions(motion, rng, len(moments))):
            files[split].append({
                "annotation_id": sum(len(v) for v in files.values()),
                "description": caption,
                "video": f"{name}.mov",
                "times": [[moment, moment]] * 4,
                "num_segments": 6,
                "dl_link": f"https://example.invalid/{name}.mov",
            })
    for split, entries in files.items():
        rng.shuffle(entries)
        _write_json(os.path.join(out_dir, "annotations", f"{split}_data.json"), entries)
    return out_dir


def make_vqa(out_dir, n, seed=0, subtypes=("train2014", "val2014")):
    """VQAv2: COCO images under {folder}/COCO_{folder}_{id:012d}.jpg with
    v2_OpenEnded_mscoco_{subtype}_questions.json and v2_mscoco_{subtype}_annotations.json. A test
    subtype (``test-dev2015``, ``test2015``) has questions only, as released, and its images in
    ``test2015``."""
    rng = random.Random(seed)
    ids = rng.sample(range(1, 600000), n)
    per_split = {s: [] for s in subtypes}
    for i, image_id in enumerate(ids):
        per_split[subtypes[i % len(subtypes)]].append(image_id)
    for subtype, image_ids in per_split.items():
        questions, annotations = [], []
        folder = subtype.replace("test-dev", "test")
        for image_id in image_ids:
            scene = random_scene(rng)
            path = os.path.join(out_dir, folder, f"COCO_{folder}_{image_id:012d}.jpg")
            _write(path, encode_jpeg(draw_scene(scene)))
            for k, (question, answer) in enumerate(scene_questions(scene, rng)):
                qid = image_id * 1000 + k
                questions.append({"image_id": image_id, "question": question, "question_id": qid})
                answers = human_answers(answer, rng)
                annotations.append({
                    "question_type": " ".join(question.lower().split()[:2]),
                    "multiple_choice_answer": answer,
                    "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": j + 1}
                                for j, a in enumerate(answers)],
                    "image_id": image_id,
                    "answer_type": "yes/no" if answer in ("yes", "no") else "number" if answer.isdigit() else "other",
                    "question_id": qid,
                })
        common = {"info": {"description": "synthetic VQAv2-format sample"}, "license": {}, "data_subtype": subtype}
        _write_json(os.path.join(out_dir, f"v2_OpenEnded_mscoco_{subtype}_questions.json"),
                    {**common, "task_type": "Open-Ended", "data_type": "mscoco", "questions": questions})
        if not subtype.startswith("test"):
            _write_json(os.path.join(out_dir, f"v2_mscoco_{subtype}_annotations.json"),
                        {**common, "data_type": "mscoco", "annotations": annotations})
    return out_dir


def make_msrvtt_qa(out_dir, n, seed=0):
    """MSRVTT-QA: videos/all/video{i}.mp4 and {train,val,test}_qa.json lists of
    {"answer", "id", "question", "video_id"} with the integer video ids of the original release."""
    rng = random.Random(seed)
    motions = _write_videos(out_dir, n, rng, os.path.join("videos", "all"))
    splits = _split_names(n, [("train", 0.6), ("val", 0.2), ("test", 0.2)])
    files = {"train": [], "val": [], "test": []}
    qid = 0
    for i, (motion, split) in enumerate(zip(motions, splits)):
        for question, answer in rng.sample(motion_questions(motion), rng.choice((2, 3))):
            files[split].append({"answer": answer, "id": qid, "question": question, "video_id": i})
            qid += 1
    for split, entries in files.items():
        _write_json(os.path.join(out_dir, f"{split}_qa.json"), entries)
    return out_dir


MAKERS = {
    "coco": make_coco,
    "flickr": make_flickr,
    "msrvtt": make_msrvtt,
    "didemo": make_didemo,
    "vqa": make_vqa,
    "msrvtt_qa": make_msrvtt_qa,
}
