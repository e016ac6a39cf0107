"""The packaged recipes (YAML, nested run configuration), and what stands in for each in smoke
runs: the sample dataset ``shard_tools`` makes in the recipe's official layout, and the tiny
backbone of the recipe's family. Used by the recipe tests and the GPU check."""

SMOKE = {
    "coco_retrieval": ("coco", "blip-tiny-retrieval"),
    "flickr_retrieval": ("flickr", "blip-tiny-retrieval"),
    "msrvtt_retrieval": ("msrvtt", "blip-tiny-retrieval"),
    "didemo_retrieval": ("didemo", "blip-tiny-retrieval"),
    "vqa": ("vqa", "blip-tiny-vqa"),
    "msrvtt_qa": ("msrvtt_qa", "blip-tiny-vqa"),
    "coco_retrieval_blip2": ("coco", "blip2-tiny-retrieval"),
    "vqa_blip2": ("vqa", "blip2-opt-tiny-vqa"),
}
