"""Sample a dataset in its official layout and shard its splits (train, test, and val where the
dataset has one: Karpathy COCO and Flickr30k) in one call.

Used by the demo, the end-to-end tests and the benchmarks: the layouts below are the ones
``sample.MAKERS`` writes, which are the datasets' official ones.
"""

from __future__ import annotations

import os
from pathlib import Path

from .convert import convert
from .sample import MAKERS

# dataset -> split -> (annotation files, media root), relative to the sample directory
LAYOUTS = {
    "coco": {"train": (["annotations/coco_karpathy_train.json"], "."),
             "val": (["annotations/coco_karpathy_val.json"], "."),
             "test": (["annotations/coco_karpathy_test.json"], ".")},
    "flickr": {"train": (["annotations/flickr30k_train.json"], "."),
               "val": (["annotations/flickr30k_val.json"], "."),
               "test": (["annotations/flickr30k_test.json"], ".")},
    "msrvtt": {"train": (["annotations/MSRVTT_data.json"], "videos/all"),
               "test": (["annotations/MSRVTT_JSFUSION_test.csv"], "videos/all")},
    "didemo": {"train": (["annotations/train_data.json"], "videos"),
               "test": (["annotations/test_data.json"], "videos")},
    "vqa": {"train": (["v2_OpenEnded_mscoco_train2014_questions.json", "v2_mscoco_train2014_annotations.json"], "."),
            "test": (["v2_OpenEnded_mscoco_val2014_questions.json", "v2_mscoco_val2014_annotations.json"], ".")},
    "msrvtt_qa": {"train": (["train_qa.json"], "videos/all"), "test": (["test_qa.json"], "videos/all")},
}


def shard_spec(prefix: str, manifest: dict) -> str:
    """A brace-expanded URL spec naming exactly the manifest's shards."""
    names = sorted(manifest["shards"])
    if len(names) == 1:
        return f"{prefix}/{names[0]}"
    stem, first, last = names[0][:-10], names[0][-10:-4], names[-1][-10:-4]
    return f"{prefix}/{stem}{{{first}..{last}}}.tar"


def sample_shards(dataset: str, n: int, raw_dir, out_prefix: str, seed: int = 0, maxcount: int = 8) -> dict:
    """Write a sample ``dataset`` under ``raw_dir`` and shard it to ``out_prefix/{train,val,test}``.

    Returns ``{"train": spec, "test": spec, "num_train": n, "num_test": n}`` with brace specs,
    and ``"val"``, ``"num_val"`` for datasets with a validation split.
    """
    raw = Path(raw_dir)
    MAKERS[dataset](str(raw), n, seed)
    result = {}
    with open(os.devnull, "w") as quiet:
        for split, (anns, media_root) in LAYOUTS[dataset].items():
            out = f"{out_prefix}/{split}"
            manifest = convert(dataset, [str(raw / a) for a in anns], str(raw / media_root), split, out,
                               maxcount=maxcount, log=quiet)
            result[split] = shard_spec(out, manifest)
            result[f"num_{split}"] = manifest["num_samples"]
    return result
