"""From the run config to the streaming loader, the tokenizer and the evaluator."""

from __future__ import annotations

import json
import tarfile
from collections import Counter
from pathlib import Path

from ..backbones.tokenizer import load_tokenizer, train_tokenizer
from ..dist import barrier, world
from .rundir import RunDir


def loader_config(cfg, image_size: int, train: bool):
    from ..data import LoaderConfig

    return LoaderConfig(
        task=cfg.task, media=cfg.media, image_size=image_size, num_frames=cfg.num_frames,
        frame_sampling=cfg.frame_sampling, batch_size=cfg.batch_size if train else cfg.eval_batch_size,
        num_workers=cfg.num_workers, seed=cfg.seed, train_num_samples=cfg.train_num_samples or None,
        max_words=cfg.max_words,
    )


def _shard_metas(spec: str):
    """The json record of every sample in the shards (media are not decoded)."""
    from ..data import expand_urls
    from ..data.storage import open_url

    for url in expand_urls(spec):
        with open_url(url) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                if member.name.endswith(".json"):
                    yield json.loads(tar.extractfile(member).read().decode("utf-8"))


def _shard_texts(spec: str):
    """Every caption, question and answer in the shards: what a local tokenizer is trained on."""
    for meta in _shard_metas(spec):
        yield from meta.get("captions", [])
        for q in meta.get("questions", []):
            yield q["question"]
            yield from q.get("answers", [])


def answer_list(cfg, size: int = 3128, path=None) -> list[str]:
    """The answer list file ``path`` (default: the configured one), else the most frequent
    training answers (BLIP ships 3,128)."""
    path = path or cfg.answer_list
    if path:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"answer list {path} does not exist")
        return json.loads(path.read_text())
    counts = Counter()
    for meta in _shard_metas(cfg.train_shards):
        for q in meta.get("questions", []):
            counts.update(q.get("answer_counts", {}))
    return [answer for answer, _ in counts.most_common(size)]


def resolve_tokenizer(cfg, vocab_size: int):
    """The configured tokenizer, else the checkpoint's, else one trained on the training text.

    Training happens on rank 0 into the run's tokenizer folder; the other ranks wait and load it.
    """
    if cfg.tokenizer:
        return load_tokenizer(cfg.tokenizer)
    if cfg.checkpoint and any(Path(cfg.checkpoint, f).exists() for f in ("tokenizer.json", "vocab.txt")):
        return load_tokenizer(cfg.checkpoint)
    path = RunDir(cfg.out_dir).tokenizer
    if world()[0] == 0 and not (path / "tokenizer.json").exists():
        train_tokenizer(_shard_texts(cfg.train_shards), vocab_size, path)
    barrier()
    return load_tokenizer(path)


def build_train_data(cfg, image_size: int, tokenizer):
    from ..data import build_loader

    return build_loader(cfg.train_shards, loader_config(cfg, image_size, True), tokenizer, mode="train")


def build_evaluator(cfg, image_size: int, tokenizer, run: RunDir, answer_file=None):
    """``evaluator(forward, handle, step) -> metrics``, also written into ``run``'s eval folder.

    QA rank inference writes the answer list it ranks into the run (``aurora-eval`` reads it
    back from the adapter's run: the same answers, not ones counted from the evaluation shards).
    """
    from ..data import build_loader

    loader = build_loader(cfg.eval_shards, loader_config(cfg, image_size, False), tokenizer, mode="eval")
    answers = answer_list(cfg, path=answer_file) if cfg.task == "qa" and cfg.inference == "rank" else None
    if answers is not None and world()[0] == 0:
        run.root.mkdir(parents=True, exist_ok=True)
        run.answer_list.write_text(json.dumps(answers))

    def evaluator(forward, handle, step):
        if cfg.task == "retrieval":
            from ..tasks.retrieval_eval import evaluate_retrieval

            metrics = evaluate_retrieval(forward, loader, cfg, tokenizer, image_size)
        else:
            from ..tasks.vqa_eval import evaluate_qa

            metrics = evaluate_qa(forward, loader, cfg, tokenizer, answers, image_size=image_size,
                                  results_path=run.eval_results(step))
        if world()[0] == 0:
            run.eval.mkdir(parents=True, exist_ok=True)
            run.eval_metrics(step).write_text(json.dumps(metrics, indent=2))
        return metrics

    return evaluator
