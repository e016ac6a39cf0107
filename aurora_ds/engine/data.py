"""From the run config to the streaming loader, the tokenizer and the evaluator."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from ..backbones.tokenizer import has_tokenizer, load_tokenizer, train_tokenizer
from ..dist import from_rank0, stop_if_any_rank_failed, world
from .rundir import RunDir


def preprocessing(cfg) -> dict:
    """The image preprocessing of the run: the checkpoint's ``preprocessor_config.json`` (mean,
    std, resample) when it has one, else BLIP's constants."""
    from ..data.media import BLIP_MEAN, BLIP_STD, read_preprocessing

    found = read_preprocessing(cfg.backbone.checkpoint or None)
    return found or {"mean": BLIP_MEAN, "std": BLIP_STD, "size": None, "resample": "bicubic"}


def loader_config(cfg, image_size: int, train: bool):
    from ..data import LoaderConfig

    prep = preprocessing(cfg)
    return LoaderConfig(
        mean=tuple(prep["mean"]), std=tuple(prep["std"]), resample=prep["resample"],
        task=cfg.objective.task, media=cfg.data.media, image_size=image_size, num_frames=cfg.data.num_frames,
        frame_sampling=cfg.data.frame_sampling, batch_size=cfg.optim.batch_size if train else cfg.eval.batch_size,
        num_workers=cfg.data.num_workers, seed=cfg.engine.seed, train_num_samples=cfg.data.train_num_samples or None,
        caption_per_sample=cfg.data.caption_per_sample, resampled=cfg.data.resampled and train,
        max_words=cfg.data.max_words, shuffle_buffer=max(0, cfg.data.shuffle_buffer),
        max_member_mb=cfg.data.max_member_mb,
    )


class SkippedSamples:
    """Samples skipped in one pass over shards: a count per reason and the first one, said at the
    end (a whole dataset of bad samples must not be held in memory, nor printed line by line)."""

    def __init__(self):
        self.counts = Counter()
        self.first = None

    def add(self, url: str, key: str, reason: str, detail: str):
        self.counts[reason] += 1
        self.first = self.first or f"shard {url}, sample {key!r}: {detail}"

    def __str__(self):
        reasons = ", ".join(f"{reason}: {n}" for reason, n in self.counts.items())
        return f"skipped {sum(self.counts.values())} sample(s) ({reasons}); first: {self.first}"


def shard_texts(spec: str, skipped: SkippedSamples | None = None):
    """Every caption, question and answer in the shards: what a local tokenizer is trained on.

    The text lives only in the samples' json (a manifest holds counts and checksums), so this
    reads the json members through the shard contract's one reader, skipping the media. A sample
    the loader would skip (json not UTF-8 or not JSON, text fields absent or not strings) is
    skipped here too, and counted in ``skipped``.
    """
    from ..data import shard_format

    skipped = skipped if skipped is not None else SkippedSamples()
    for url, key, meta in shard_format.iter_metas(spec, skipped.add):
        try:
            texts = list(shard_format.sample_texts(meta))
            if not all(isinstance(text, str) for text in texts):
                raise TypeError("a caption, question or answer is not a string")
        except (KeyError, TypeError, AttributeError) as exn:  # absent or wrongly typed field
            skipped.add(url, key, "missing_field", f"{type(exn).__name__}: {exn}")
            continue
        yield from texts


ANSWER_LIST_SIZE = 3128  # BLIP's VQA answer list


def answer_list(cfg, run: RunDir, size: int = ANSWER_LIST_SIZE) -> list[str]:
    """The answers QA candidate inference ranks, built once by rank 0 (saved in ``run.answer_list``
    for the adapter) and sent to every rank: ``eval.answer_list`` (``aurora-eval`` points it at
    the list the adapter carries), else the ``size`` most frequent answers of the training
    annotations (BLIP ships 3,128), from the ``answers.json`` that ``aurora-shard convert`` writes
    next to the training shards. The shards themselves are never streamed for it. A missing
    source is an error naming the key."""
    problem = answers = None
    if world()[0] == 0:
        try:
            if cfg.eval.answer_list:
                answers = read_answer_list(cfg.eval.answer_list, "eval.answer_list")
            else:
                answers = _training_answers(cfg.data.train_shards, size)
            run.root.mkdir(parents=True, exist_ok=True)
            tmp = run.answer_list.with_name(run.answer_list.name + ".tmp")
            tmp.write_text(json.dumps(answers))
            tmp.replace(run.answer_list)
        except (OSError, ValueError) as exn:
            problem = exn
    stop_if_any_rank_failed(problem, "building the VQA answer list")
    return from_rank0(answers)


def read_answer_list(path, where: str, size: int = ANSWER_LIST_SIZE) -> list[str]:
    """A JSON list of answer strings, or the ``answers.json`` that ``aurora-shard convert`` writes
    (``{answer: count}``: its ``size`` most frequent, the list a run on those shards ranks);
    errors name ``where`` it was configured (a key) and the path."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{where}={path}: the answer list file does not exist")
    try:
        answers = json.loads(path.read_text())
    except ValueError as exn:
        raise ValueError(f"{where}={path}: not valid JSON: {exn}") from None
    if isinstance(answers, dict) and all(isinstance(n, int) for n in answers.values()):
        answers = [answer for answer, _ in Counter(answers).most_common(size)]
    if not answers or not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
        raise ValueError(f"{where}={path}: expected a non-empty JSON list of answer strings, or an answers.json "
                         "of answer counts as aurora-shard writes it")
    return answers


def _training_answers(spec: str, size: int) -> list[str]:
    from ..data import shard_format

    try:
        counts = shard_format.read_answers(spec)
    except FileNotFoundError as exn:
        raise FileNotFoundError(
            f"data.train_shards={spec}: no {shard_format.ANSWERS} at {exn.args[0] if exn.args else exn} to build the "
            f"VQA answer list from (aurora-shard convert writes it next to a QA split's shards): convert the training "
            f"annotations again, or set eval.answer_list=FILE.json") from None
    if not counts:
        raise ValueError(f"data.train_shards={spec}: its {shard_format.ANSWERS} lists no answers (a split without "
                         "annotations, such as test-dev?): train on a split with answers, or set eval.answer_list=FILE.json")
    return [answer for answer, _ in counts.most_common(size)]


def tokenizer_source(cfg) -> tuple[str, str] | None:
    """(config key, directory) of the tokenizer a run uses, when one is given or shipped with
    the checkpoint; None when one is to be trained on the captions (``backbone.train_tokenizer``,
    or no checkpoint: random weights)."""
    if cfg.backbone.tokenizer:
        return "backbone.tokenizer", cfg.backbone.tokenizer
    if cfg.backbone.checkpoint and not cfg.backbone.train_tokenizer and has_tokenizer(cfg.backbone.checkpoint):
        return "backbone.checkpoint", cfg.backbone.checkpoint
    return None


def resolve_tokenizer(cfg, vocab_size: int, log=None):
    """The configured tokenizer, else the checkpoint's, else one trained on the training text.

    Training happens once, on rank 0, into the run's tokenizer folder; its files are sent to the
    other ranks, which save them into their own view of that folder (nodes need not share a
    filesystem) and load them from there. Samples skipped while reading the text are counted
    and said at the end through ``log`` (a print-like callable).
    """
    source = tokenizer_source(cfg)
    if source is not None:
        return load_tokenizer(source[1], source[0])
    from ..backbones.tokenizer import tokenizer_files

    path = RunDir(cfg.output.dir).tokenizer
    problem = files = None
    if world()[0] == 0:
        try:
            if not (path / "tokenizer.json").exists():
                skipped = SkippedSamples()
                train_tokenizer(shard_texts(cfg.data.train_shards, skipped), vocab_size, path)
                if skipped.counts and log is not None:
                    log(f"[aurora] tokenizer trained on data.train_shards={cfg.data.train_shards}: {skipped}")
            files = {f.name: f.read_bytes() for f in tokenizer_files(path)}
        except Exception as exn:  # noqa: BLE001 - every rank must learn of it, then all stop
            problem = exn
    stop_if_any_rank_failed(problem, f"training a tokenizer on data.train_shards into {path}")
    files = from_rank0(files)
    if world()[0] != 0:
        path.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            if not (path / name).is_file() or (path / name).read_bytes() != data:
                tmp = path / f".{name}.{world()[0]}.tmp"
                tmp.write_bytes(data)
                tmp.replace(path / name)
    return load_tokenizer(path)


def media_size(cfg, spec, config, log=None) -> int:
    """The image side the run feeds: ``data.image_size`` (a recipe's or an override), else the
    checkpoint's preprocessor size, else its vision config's, else the registry's. A configured
    size that differs from the checkpoint's is said in the log (``log``: a print-like callable)."""
    vision = getattr(config, "vision_config", None)
    own = preprocessing(cfg)["size"] or int(getattr(vision, "image_size", 0) or 0)
    if cfg.data.image_size and cfg.backbone.checkpoint and own and cfg.data.image_size != own and log is not None:
        log(f"[aurora] data.image_size={cfg.data.image_size} (recipe {cfg.recipe or 'none'} or --set) overrides the "
            f"checkpoint's {own} px ({cfg.backbone.checkpoint}/preprocessor_config.json or config.json)")
    return cfg.data.image_size or own or spec.image_size


def text_conventions(cfg, spec, config, tokenizer, trained_here: bool):
    """The tokenizer made to follow the backbone's conventions, checked against the backbone's
    config (the checkpoint's, not the registry's) before anything is built: BLIP's [DEC]/[ENC]
    (``backbones/blip.py``), then the vocabulary. Returns BLIP's ``SpecialTokens`` (None for
    other interfaces)."""
    from ..backbones import text_vocab_size
    from ..backbones import blip

    where = (f"backbone.checkpoint={cfg.backbone.checkpoint} (config.json)" if cfg.backbone.checkpoint
             else f"the {cfg.backbone.name} config")
    special = None
    if spec.interface == "blip":
        special = blip.special_tokens(config, tokenizer, cfg.backbone.blip_special_tokens, where, strict=not trained_here)
    vocab = text_vocab_size(spec, config)
    if len(tokenizer) > vocab:
        source = tokenizer_source(cfg)
        raise ValueError(f"the tokenizer ({'='.join(source) if source else 'trained on the captions'}) has "
                         f"{len(tokenizer)} tokens, more than the vocabulary of {where}: {vocab}")
    return special


def build_train_data(cfg, image_size: int, tokenizer):
    from ..data import build_loader

    return build_loader(cfg.data.train_shards, loader_config(cfg, image_size, True), tokenizer, mode="train")


def build_evaluator(cfg, image_size: int, tokenizer, run: RunDir, split: str = "val"):
    """``evaluator(forward, handle, step, about=None) -> metrics`` on ``data.eval_shards``
    (``split="val"``) or ``data.test_shards`` (``"test"``), also written into ``run``'s eval
    folder, with ``about`` (e.g. which adapter was evaluated) beside the metrics.

    QA candidate inference ranks ``answer_list``'s answers (the configured list, else the training
    annotations' answers), saved in the run; ``aurora-eval`` configures the list the adapter
    carries: the same answers, never ones counted from the evaluation shards.
    """
    from ..data import build_loader

    spec = cfg.data.test_shards if split == "test" else cfg.data.eval_shards
    loader = build_loader(spec, loader_config(cfg, image_size, False), tokenizer, mode="eval")
    answers = answer_list(cfg, run) if cfg.objective.task == "qa" and cfg.eval.inference == "candidates" else None

    def evaluator(forward, handle, step, about: dict | None = None):
        if cfg.objective.task == "retrieval":
            from ..tasks.retrieval_eval import evaluate_retrieval

            metrics = evaluate_retrieval(forward, loader, cfg, tokenizer, image_size)
        else:
            from ..tasks.vqa_eval import evaluate_qa

            metrics = evaluate_qa(forward, loader, cfg, tokenizer, answers, image_size=image_size,
                                  results_path=run.eval_results(step, split))
        if world()[0] == 0:
            run.eval.mkdir(parents=True, exist_ok=True)
            run.eval_metrics(step, split).write_text(json.dumps({**(about or {}), **metrics}, indent=2))
        return metrics

    return evaluator
