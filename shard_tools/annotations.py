"""Readers for the official annotation formats, producing one Record per image or video.

Each reader takes the annotation paths, the split to select, the media root and a Faults
collector, and returns Records in annotation order (so the output is deterministic). Nothing is
dropped without a fault being counted.
"""

import collections
import csv
import io
import json
import operator
import os
import re
from dataclasses import dataclass, field

from aurora_ds.data import shard_format

KINDS = {
    "coco": "image",
    "flickr": "image",
    "msrvtt": "video",
    "didemo": "video",
    "vqa": "image_qa",
    "msrvtt_qa": "video_qa",
}
# COCO image ids are written zero-padded in file names; keys follow that convention.
ID_WIDTH = {"coco": 12, "vqa": 12}


@dataclass
class Record:
    id: str
    file: str
    captions: list = field(default_factory=list)
    questions: list = field(default_factory=list)
    sentences: list = field(default_factory=list)


def sample_key(dataset, source_id):
    """Stable, unique key without dots (webdataset splits the extension at the first dot)."""
    sid = str(source_id)
    if dataset in ID_WIDTH and sid.isdigit():
        sid = sid.zfill(ID_WIDTH[dataset])
    return f"{dataset}_{re.sub(r'[^A-Za-z0-9_-]', '_', sid)}"


def sample_meta(record, dataset, split):
    """The sample's `json` field, in the form shard_format defines (the contract with the loader)."""
    qa = KINDS[dataset].endswith("_qa")
    return shard_format.sample_meta(record.id, record.file, dataset, split,
                                    captions=None if qa else record.captions,
                                    questions=record.questions if qa else None, sentences=record.sentences)


def printable(text):
    """Text safe to print and store in JSON even when it carries undecodable bytes."""
    if not isinstance(text, str):
        return repr(text)
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def read_text(path):
    """File contents as str; invalid UTF-8 bytes survive as surrogates so they can be reported
    per caption instead of failing the whole file."""
    with open(path, "rb") as f:
        return f.read().decode("utf-8", "surrogateescape")


def load_json(path):
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as exn:
        raise ValueError(f"annotation file {path} is not valid JSON: {exn}") from None


def clean_text(text, faults, ann, source_id):
    """Stripped text, or None with a fault counted for empty or non-UTF-8 text."""
    detail = {"annotation": os.path.basename(ann), "id": str(source_id), "text": printable(text)}
    if not isinstance(text, str) or not text.strip():
        faults.add("empty_text", detail)
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        faults.add("non_utf8_text", detail)
        return None
    return text.strip()


class Collector:
    """Records by id in first-seen order, with duplicate detection for one-entry-per-item formats."""

    def __init__(self, faults):
        self.faults = faults
        self.records = {}

    def new(self, source_id, file, ann):
        """A fresh record, or None (and a duplicate_id fault) when the id was seen before."""
        source_id = str(source_id)
        if source_id in self.records:
            self.faults.add("duplicate_id", {"annotation": os.path.basename(ann), "id": source_id, "file": file})
            return None
        self.records[source_id] = Record(source_id, file)
        return self.records[source_id]

    def get(self, source_id, file):
        """The record for an id, created on first use (formats with one entry per caption)."""
        source_id = str(source_id)
        if source_id not in self.records:
            self.records[source_id] = Record(source_id, file)
        return self.records[source_id]

    def add_captions(self, record, captions, ann):
        for caption in captions:
            text = clean_text(caption, self.faults, ann, record.id)
            if text is not None and text in record.captions:  # the same entry twice: it would train twice
                self.faults.add("duplicate_entry", {"annotation": os.path.basename(ann), "id": record.id,
                                                    "file": record.file, "caption": text})
            elif text is not None:
                record.captions.append(text)


def _image_id(dataset, path):
    """COCO: the integer image id in the file name; Flickr30k: the photo id (file stem)."""
    stem = os.path.splitext(os.path.basename(path))[0]
    if dataset in ID_WIDTH:
        return str(int(re.findall(r"\d+", stem)[-1]))
    return stem


def read_image_captions(dataset, anns, split, media_root, faults):
    """COCO / Flickr30k: BLIP's karpathy train (one entry per caption) and val/test (caption
    lists), Karpathy's dataset_*.json (selected by split, restval counted as train) and the
    official COCO captions_*.json."""
    out = Collector(faults)
    for ann in anns:
        data = load_json(ann)
        if isinstance(data, list):
            for entry in data:
                image = entry["image"]
                if isinstance(entry.get("caption"), list):
                    record = out.new(_image_id(dataset, image), image, ann)
                    if record:
                        out.add_captions(record, entry["caption"], ann)
                else:
                    out.add_captions(out.get(_image_id(dataset, image), image), [entry.get("caption")], ann)
        elif "annotations" in data:
            by_id = {}
            for image in data["images"]:
                record = out.new(image["id"], image["file_name"], ann)
                if record:
                    by_id[image["id"]] = record
            for a in data["annotations"]:
                if a["image_id"] in by_id:
                    out.add_captions(by_id[a["image_id"]], [a.get("caption")], ann)
                else:
                    faults.add("unknown_media", {"annotation": os.path.basename(ann), "id": str(a["image_id"]),
                                                 "text": printable(a.get("caption"))})
        else:
            wanted = {split, "restval"} if split == "train" else {split}
            for image in data["images"]:
                if image["split"] not in wanted:
                    continue
                file = "/".join(p for p in (image.get("filepath", ""), image["filename"]) if p)
                source_id = image.get("cocoid", _image_id(dataset, image["filename"]))
                record = out.new(source_id, file, ann)
                if record:
                    out.add_captions(record, [s.get("raw") for s in image["sentences"]], ann)
    return list(out.records.values())


def read_msrvtt(dataset, anns, split, media_root, faults):
    """MSRVTT: MSRVTT_data.json (videos selected by split, "val" = "validate"), the 1k-A test csv
    (columns key,vid_key,video_id,sentence) and txt_db jsonl ({"clip_name", "caption"})."""
    out = Collector(faults)
    for ann in anns:
        if ann.endswith(".csv"):
            for row in csv.DictReader(io.StringIO(read_text(ann))):
                vid = row["video_id"]
                out.add_captions(out.get(vid, f"{vid}.mp4"), [row.get("sentence")], ann)
        elif ann.endswith(".jsonl"):
            for line in read_text(ann).splitlines():
                if line.strip():
                    entry = json.loads(line)
                    vid = entry.get("clip_name") or entry["video_id"]
                    out.add_captions(out.get(vid, f"{vid}.mp4"), [entry.get("caption", entry.get("sentence"))], ann)
        else:
            data = load_json(ann)
            wanted = {"val": "validate"}.get(split, split)
            listed, selected = set(), {}
            for video in data["videos"]:
                vid = video["video_id"]
                listed.add(vid)
                if video["split"] == wanted:
                    record = out.new(vid, f"{vid}.mp4", ann)
                    if record:
                        selected[vid] = record
            for s in data["sentences"]:
                if s["video_id"] in selected:
                    out.add_captions(selected[s["video_id"]], [s.get("caption")], ann)
                elif s["video_id"] not in listed:
                    faults.add("unknown_media", {"annotation": os.path.basename(ann), "id": s["video_id"],
                                                 "text": printable(s.get("caption"))})
    return list(out.records.values())


def _didemo_file(video, media_root):
    """DiDeMo annotations name the original .mov; the files are usually converted to .mp4."""
    if os.path.exists(os.path.join(media_root, video)):
        return video
    mp4 = os.path.splitext(video)[0] + ".mp4"
    return mp4 if os.path.exists(os.path.join(media_root, mp4)) else video


def read_didemo(dataset, anns, split, media_root, faults):
    """DiDeMo {train,val,test}_data.json: moment descriptions grouped per video, ordered by start
    time; the caption is their paragraph (video-paragraph retrieval), sentences kept too."""
    out = Collector(faults)
    seen, moments = set(), collections.defaultdict(list)
    for ann in anns:
        for entry in load_json(ann):
            aid = str(entry.get("annotation_id"))
            if aid in seen:
                faults.add("duplicate_id", {"annotation": os.path.basename(ann), "id": aid, "video": entry["video"]})
                continue
            seen.add(aid)
            record = out.get(os.path.splitext(entry["video"])[0], _didemo_file(entry["video"], media_root))
            text = clean_text(entry.get("description"), faults, ann, record.id)
            if text is not None:
                start = min((t[0] for t in entry.get("times") or [[0, 0]]), default=0)
                moments[record.id].append((start, text))
    for record in out.records.values():
        record.sentences = [text for _, text in sorted(moments[record.id], key=operator.itemgetter(0))]
        record.captions = [" ".join(record.sentences)] if record.sentences else []
    return list(out.records.values())


def read_vqa(dataset, anns, split, media_root, faults):
    """VQAv2 questions + annotations json (annotations optional, e.g. test2015); one record per
    image with its questions and all human answers."""
    docs = [(ann, load_json(ann)) for ann in anns]
    answers = {}
    for ann, doc in docs:
        if "annotations" in doc:
            for a in doc["annotations"]:
                answers[a["question_id"]] = ([x["answer"] for x in a["answers"]], ann)
    out = Collector(faults)
    seen = set()
    for ann, doc in docs:
        if "questions" not in doc:
            continue
        folder = doc.get("data_subtype", split).replace("test-dev", "test")
        for q in doc["questions"]:
            if q["question_id"] in seen:
                faults.add("duplicate_id", {"annotation": os.path.basename(ann), "id": str(q["question_id"])})
                continue
            seen.add(q["question_id"])
            image_id = q["image_id"]
            record = out.get(image_id, f"{folder}/COCO_{folder}_{image_id:012d}.jpg")
            text = clean_text(q.get("question"), faults, ann, q["question_id"])
            if text is not None:
                record.questions.append(shard_format.question(q["question_id"], text, answers.get(q["question_id"], ([], ann))[0]))
    for qid, (_, ann) in answers.items():
        if qid not in seen:
            faults.add("unknown_media", {"annotation": os.path.basename(ann), "id": str(qid),
                                         "reason": "answers for a question not in the questions file"})
    return list(out.records.values())


def read_msrvtt_qa(dataset, anns, split, media_root, faults):
    """MSRVTT-QA {train,val,test}_qa.json: questions grouped per video; integer video ids (the
    original release) name video{N}.mp4."""
    out = Collector(faults)
    seen = set()
    for ann in anns:
        for entry in load_json(ann):
            if entry["id"] in seen:
                faults.add("duplicate_id", {"annotation": os.path.basename(ann), "id": str(entry["id"])})
                continue
            seen.add(entry["id"])
            vid = entry.get("video_id", entry.get("video"))
            vid = f"video{vid}" if isinstance(vid, int) else os.path.splitext(vid)[0]
            record = out.get(vid, f"{vid}.mp4")
            text = clean_text(entry.get("question"), faults, ann, entry["id"])
            if text is not None:
                answer = entry.get("answer")
                record.questions.append(shard_format.question(entry["id"], text, [answer] if answer else []))
    return list(out.records.values())


READERS = {
    "coco": read_image_captions,
    "flickr": read_image_captions,
    "msrvtt": read_msrvtt,
    "didemo": read_didemo,
    "vqa": read_vqa,
    "msrvtt_qa": read_msrvtt_qa,
}


def read_records(dataset, anns, split, media_root, faults):
    """Records for one dataset split, with text-less records and key collisions counted and dropped."""
    records, keys = [], set()
    for record in READERS[dataset](dataset, anns, split, media_root, faults):
        key = sample_key(dataset, record.id)
        if not (record.captions or record.questions):
            faults.add("no_text", {"id": record.id, "file": record.file})
        elif key in keys:
            faults.add("duplicate_id", {"id": record.id, "file": record.file, "key": key})
        else:
            keys.add(key)
            records.append(record)
    return records
