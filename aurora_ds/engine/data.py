"""From the run config to the streaming loader, the tokenizer and the evaluator."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from ..backbones.tokenizer import load_tokenizer, train_tokenizer
from ..dist import barrier, world
from .rundir import RunDir


def loader_config(cfg, image_size: int, train: bool):
    from ..data import LoaderConfig

    return LoaderConfig(
        task=cfg.objective.task, media=cfg.data.media, image_size=image_size, num_frames=cfg.data.num_frames,
        frame_sampling=cfg.data.frame_sampling, batch_size=cfg.optim.batch_size if train else cfg.eval.batch_size,
        num_workers=cfg.data.num_workers, seed=cfg.engine.seed, train_num_samples=cfg.data.train_num_samples or None,
        max_words=cfg.data.max_words, shuffle_buffer=max(0, cfg.data.shuffle_buffer),
    )


def _shard_texts(spec: str):
    """Every caption, question and answer in the shards: what a local tokenizer is trained on.

    The text lives only in the samples' json (a manifest holds counts and checksums), so this
    reads the json members through the shard contract's one reader, skipping the media.
    """
    from ..data import shard_format

    for meta in shard_format.iter_metas(spec):
        yield from shard_format.sample_texts(meta)


def answer_list(cfg, size: int = 3128, path=None) -> list[str]:
    """The answer list file ``path`` (default: the configured one), else the most frequent
    training answers (BLIP ships 3,128)."""
    path = path or cfg.eval.answer_list
    if path:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"answer list {path} does not exist")
        return json.loads(path.read_text())
    from ..data import shard_format

    counts = Counter()
    for meta in shard_format.iter_metas(cfg.data.train_shards):
        counts.update(shard_format.answer_counts(meta))
    return [answer for answer, _ in counts.most_common(size)]


def resolve_tokenizer(cfg, vocab_size: int):
    """The configured tokenizer, else the checkpoint's, else one trained on the training text.

    Training happens on rank 0 into the run's tokenizer folder; the other ranks wait and load it.
    """
    if cfg.backbone.tokenizer:
        return load_tokenizer(cfg.backbone.tokenizer)
    if cfg.backbone.checkpoint and any(Path(cfg.backbone.checkpoint, f).exists() for f in ("tokenizer.json", "vocab.txt")):
        return load_tokenizer(cfg.backbone.checkpoint)
    path = RunDir(cfg.output.dir).tokenizer
    if world()[0] == 0 and not (path / "tokenizer.json").exists():
        train_tokenizer(_shard_texts(cfg.data.train_shards), vocab_size, path)
    barrier()
    return load_tokenizer(path)


def build_train_data(cfg, image_size: int, tokenizer):
    from ..data import build_loader

    return build_loader(cfg.data.train_shards, loader_config(cfg, image_size, True), tokenizer, mode="train")


def build_evaluator(cfg, image_size: int, tokenizer, run: RunDir, answer_file=None):
    """``evaluator(forward, handle, step) -> metrics``, also written into ``run``'s eval folder.

    QA rank inference writes the answer list it ranks into the run (``aurora-eval`` reads it
    back from the adapter's run: the same answers, not ones counted from the evaluation shards).
    """
    from ..data import build_loader

    loader = build_loader(cfg.data.eval_shards, loader_config(cfg, image_size, False), tokenizer, mode="eval")
    answers = answer_list(cfg, path=answer_file) if cfg.objective.task == "qa" and cfg.eval.inference == "rank" else None
    if answers is not None and world()[0] == 0:
        run.root.mkdir(parents=True, exist_ok=True)
        run.answer_list.write_text(json.dumps(answers))

    def evaluator(forward, handle, step):
        if cfg.objective.task == "retrieval":
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
