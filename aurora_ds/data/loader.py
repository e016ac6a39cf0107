"""WebDataset shards -> batches: split by node and worker, shuffle, decode, transform, tokenize.

Each DataLoader worker runs one straight pipeline of generators (``ShardStream.__iter__``):

    its shards -> tar samples -> items (one per caption/question) -> shuffle buffer
      -> decode + transform -> batches (tokenised)

and keeps a small ledger (``Ledger``) that every batch carries back to the main process: the
samples it skipped and why, how many media it delivered and which shards it finished. The main
process (``Loader``) sums these into fault totals, the resume position (shards consumed) and the
end-of-epoch check against the manifest.

Sample faults (undecodable media, missing fields) are skipped and counted. Shard faults
(missing, truncated, unreachable, frozen endpoint) are retried ``max_shard_retries`` times, then
raise ``ShardError`` naming the URL. Retries resume after the samples already delivered, so a
retried shard never yields duplicates.
"""

import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import time
from collections import Counter
from itertools import islice
from typing import Optional

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from . import media, shard_format, storage
from .text import pre_caption, pre_question, tokenize
from .shard_format import read_manifest
from .urls import expand_urls

log = logging.getLogger(__name__)


class ShardError(RuntimeError):
    """A shard could not be read after bounded retries (the message names the URL)."""


class DataShortfallError(RuntimeError):
    """An epoch delivered fewer samples than the manifest lists, beyond ``missing_tolerance``."""

_BLIP_MEAN, _BLIP_STD = media.BLIP_MEAN, media.BLIP_STD


@dataclasses.dataclass
class LoaderConfig:
    """Everything the loader needs besides the URLs and the tokenizer.

    ``train_num_samples`` counts training items (caption pairs or questions) per epoch over all
    ranks; in resampled mode it defaults to the manifest's sample count. ``frame_sampling``
    applies in training; evaluation always samples uniformly. ``worker_timeout`` bounds the wait
    for one batch from a worker (0 disables); shard reads have their own, shorter timeouts.
    """

    task: str = "retrieval"
    media: str = "image"
    image_size: int = 384
    num_frames: int = 8
    frame_sampling: str = "random"
    batch_size: int = 32
    num_workers: int = 2
    seed: int = 0
    shuffle_buffer: int = 1000
    resampled: bool = False
    train_num_samples: Optional[int] = None
    max_words: int = 30
    max_tokens: int = 35
    caption_per_sample: str = "random"
    missing_tolerance: float = 0.0
    max_shard_retries: int = 2
    worker_timeout: float = 60.0
    augment: bool = True
    mean: tuple = _BLIP_MEAN  # normalisation and interpolation: the checkpoint's
    std: tuple = _BLIP_STD  # (preprocessor_config.json), BLIP's by default
    resample: str = "bicubic"

    def __post_init__(self):
        def check(ok, msg):
            if not ok:
                raise ValueError("LoaderConfig: " + msg)

        check(self.task in ("retrieval", "qa"), f"task must be 'retrieval' or 'qa', got {self.task!r}")
        check(self.media in ("image", "video"), f"media must be 'image' or 'video', got {self.media!r}")
        check(self.frame_sampling in media.FRAME_SAMPLINGS,
              f"frame_sampling must be one of {media.FRAME_SAMPLINGS}, got {self.frame_sampling!r}")
        check(self.caption_per_sample in ("random", "all"),
              f"caption_per_sample must be 'random' or 'all', got {self.caption_per_sample!r}")
        for name in ("image_size", "num_frames", "batch_size", "max_words", "max_tokens"):
            check(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("num_workers", "shuffle_buffer", "max_shard_retries", "worker_timeout"):
            check(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        check(0.0 <= self.missing_tolerance < 1.0,
              f"missing_tolerance is a fraction in [0, 1), got {self.missing_tolerance}")
        check(self.train_num_samples is None or self.train_num_samples >= 1,
              f"train_num_samples must be >= 1 or None, got {self.train_num_samples}")


def rank_world():
    """(rank, world size) from torch.distributed when initialised, else RANK / WORLD_SIZE."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def derive_seed(*parts):
    """A 63-bit seed from any parts, the same in every process (unlike ``hash``)."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class RateLimitedWarnings:
    """The first warning per reason, then at most one per ``interval`` seconds with the running count.

    Never sleeps (webdataset's warn_and_continue sleeps 0.5 s per warning).
    """

    def __init__(self, interval=10.0):
        self.interval = interval
        self.last = {}
        self.count = Counter()

    def warn(self, reason, detail):
        self.count[reason] += 1
        now = time.monotonic()
        if reason not in self.last or now - self.last[reason] >= self.interval:
            self.last[reason] = now
            log.warning("skipped sample (%s), %d so far in this worker: %s",
                        reason, self.count[reason], detail)


class Ledger:
    """Per-worker bookkeeping, handed to the main process with each batch (deltas since the last)."""

    def __init__(self):
        self.pending = Counter()
        self.finished = set()
        self.skipped = Counter()
        self.retries = 0
        self.media = 0
        self.done = []
        self.warnings = RateLimitedWarnings()

    def read(self, shard, n=1):
        self.pending[shard] += n

    def release(self, shard):
        self.pending[shard] -= 1
        self._settle(shard)

    def shard_finished(self, shard):
        self.finished.add(shard)
        self._settle(shard)

    def _settle(self, shard):
        if shard in self.finished and self.pending[shard] == 0:
            self.finished.discard(shard)
            del self.pending[shard]
            self.done.append(shard)

    def skip(self, item, reason, detail):
        self.skipped[reason] += 1
        self.warnings.warn(reason, "%s in %s: %s" % (item.get("__key__"), item["__shard__"], detail))
        self.release(item["__shard__"])

    def deliver(self, item):
        self.media += int(item.get("__first__", False))
        self.release(item["__shard__"])

    def has_news(self):
        return bool(self.skipped or self.retries or self.media or self.done)

    def take(self):
        """(skipped, info) since the previous call."""
        skipped = dict(self.skipped)
        info = {"media": self.media, "done_shards": self.done, "shard_retries": self.retries}
        self.skipped, self.media, self.done, self.retries = Counter(), 0, [], 0
        return skipped, info


class SampleError(Exception):
    def __init__(self, reason, detail):
        super().__init__(detail)
        self.reason = reason


def _close_quietly(stream):
    try:
        stream.close()
    except Exception:  # the stream is abandoned anyway (e.g. a pipe killed by SIGPIPE)
        pass


def read_shard(url, max_retries, ledger):
    """The samples of one shard; read errors are retried, skipping samples already delivered."""
    delivered = 0
    for attempt in range(max_retries + 1):
        try:
            stream = storage.open_url(url, "rb")
            complete = False
            try:
                for i, sample in enumerate(shard_format.iter_tar_samples(stream)):
                    if i >= delivered:
                        delivered += 1
                        sample["__shard__"] = url
                        yield sample
                complete = True
            finally:
                if complete:
                    stream.close()  # a pipe reports a failed command here
                else:
                    _close_quietly(stream)
            return
        except Exception as exn:
            if attempt == max_retries:
                raise ShardError("cannot read shard %s after %d attempt(s), %d sample(s) read: %s: %s"
                                 % (url, attempt + 1, delivered, type(exn).__name__, exn)) from exn
            ledger.retries += 1
            log.warning("shard %s: %s: %s; retrying (%d/%d)", url, type(exn).__name__, exn,
                        attempt + 1, max_retries)
            time.sleep(min(2 ** attempt, 8))


def read_shards(urls, max_retries, ledger):
    for url in urls:
        for sample in read_shard(url, max_retries, ledger):
            ledger.read(url)
            yield sample
        ledger.shard_finished(url)


def resampled_urls(urls, rng):
    """Shards drawn with replacement, forever (epochs are cut by a batch count)."""
    while True:
        yield rng.choice(urls)


def sample_items(sample, cfg, train, rng):
    """One shard sample -> its items: caption pairs, one eval entry, or one item per question."""
    ext = shard_format.media_field(sample, cfg.media)
    if ext is None:
        exts = shard_format.IMAGE_EXTS if cfg.media == "image" else shard_format.VIDEO_EXTS
        raise SampleError("missing_field", "no %s member" % "/".join(exts))
    if shard_format.JSON not in sample:
        raise SampleError("missing_field", "no json member")
    try:
        meta = json.loads(sample[shard_format.JSON])
    except ValueError as exn:
        raise SampleError("bad_json", str(exn))
    key = sample[shard_format.KEY]
    base = {"__shard__": sample["__shard__"], "__key__": key, "media": sample[ext],
            "media_id": str(meta.get("id", key))}
    try:
        if cfg.task == "retrieval":
            captions = [pre_caption(c, cfg.max_words) for c in shard_format.captions(meta)]
            if not captions:
                raise SampleError("missing_field", "empty captions")
            if not train:
                items = [dict(base, captions=captions)]
            elif cfg.caption_per_sample == "random":
                items = [dict(base, caption=rng.choice(captions))]
            else:
                items = [dict(base, caption=c) for c in captions]
        else:
            items = []
            for question_id, question, counts in shard_format.questions(meta):
                total = sum(counts.values())
                items.append(dict(base, question=pre_question(question, cfg.max_words),
                                  question_id=question_id, answers=list(counts),
                                  answer_weights=[n / total for n in counts.values()]))
            if not items:
                raise SampleError("missing_field", "no questions")
    except (KeyError, TypeError, AttributeError) as exn:  # absent or wrongly typed field
        raise SampleError("missing_field", "json field: %s: %s" % (type(exn).__name__, exn))
    items[0]["__first__"] = True
    return items


def expand_items(samples, cfg, train, rng, ledger):
    for sample in samples:
        try:
            items = sample_items(sample, cfg, train, rng)
        except SampleError as exn:
            ledger.skip(sample, exn.reason, exn)
            continue
        ledger.read(sample["__shard__"], len(items) - 1)
        yield from items


def shuffle(items, bufsize, rng, initial=100):
    """webdataset's shuffle buffer: starts yielding at ``initial`` items, grows to ``bufsize``."""
    items = iter(items)
    initial = min(initial, bufsize)
    buf = []
    for item in items:
        buf.append(item)
        if len(buf) < bufsize:
            buf.extend(islice(items, 1))
        if len(buf) >= initial:
            k = rng.randrange(len(buf))
            buf[k], buf[-1] = buf[-1], buf[k]
            yield buf.pop()
    while buf:
        k = rng.randrange(len(buf))
        buf[k], buf[-1] = buf[-1], buf[k]
        yield buf.pop()


def decode_items(items, cfg, transform, sampling, rng, ledger):
    for item in items:
        try:
            data = item.pop("media")
            if cfg.media == "image":
                pixels = media.decode_image(data)
            else:
                pixels = media.decode_video(data, cfg.num_frames, sampling, rng)
            item["pixel_values"] = transform(pixels).as_subclass(torch.Tensor)
        except Exception as exn:  # any decoder error means this sample's bytes are bad
            ledger.skip(item, "decode_" + cfg.media, "%s: %s" % (type(exn).__name__, exn))
            continue
        yield item


def collate(items, cfg, tokenizer, train, ledger):
    batch = {"pixel_values": torch.stack([it["pixel_values"] for it in items]),
             "media_id": [it["media_id"] for it in items]}
    if cfg.task == "retrieval" and train:
        batch["caption"] = [it["caption"] for it in items]
        batch.update(tokenize(tokenizer, batch["caption"], cfg.max_tokens))
    elif cfg.task == "retrieval":
        batch["captions"] = [it["captions"] for it in items]
    else:
        for key in ("question", "question_id", "answers", "answer_weights"):
            batch[key] = [it[key] for it in items]
        batch.update(tokenize(tokenizer, batch["question"], cfg.max_tokens))
    for it in items:
        ledger.deliver(it)
    batch["skipped"], batch["__info__"] = ledger.take()
    return batch


def batches(items, cfg, tokenizer, train, ledger):
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == cfg.batch_size:
            yield collate(chunk, cfg, tokenizer, train, ledger)
            chunk = []
    if chunk:
        yield collate(chunk, cfg, tokenizer, train, ledger)


class ShardStream(IterableDataset):
    """What one DataLoader worker runs. Picklable: plain attributes, module-level stages."""

    def __init__(self, cfg, tokenizer, train, rank, shards, all_shards, epoch, worker_batches, resume_tag):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.train = train
        self.rank = rank
        self.shards = shards
        self.all_shards = all_shards
        self.epoch = epoch
        self.worker_batches = worker_batches
        self.resume_tag = resume_tag

    def __iter__(self):
        cfg = self.cfg
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        rng = random.Random(derive_seed(cfg.seed, self.epoch, self.rank, worker, self.resume_tag))
        ledger = Ledger()
        if cfg.resampled:
            urls = resampled_urls(self.all_shards, rng)
        else:
            urls = self.shards[worker::num_workers]
        augment = self.train and cfg.augment
        transform = media.build_transform(cfg.image_size, augment, cfg.mean, cfg.std, cfg.resample)
        sampling = cfg.frame_sampling if augment else "uniform"

        stream = read_shards(urls, cfg.max_shard_retries, ledger)
        stream = expand_items(stream, cfg, self.train, rng, ledger)
        if self.train and cfg.shuffle_buffer > 1:
            stream = shuffle(stream, cfg.shuffle_buffer, rng)
        stream = decode_items(stream, cfg, transform, sampling, rng, ledger)
        stream = batches(stream, cfg, self.tokenizer, self.train, ledger)
        if self.worker_batches is not None:
            stream = islice(stream, self.worker_batches)
        yield from stream
        if ledger.has_news():  # what happened after the last batch still reaches the main process
            skipped, news = ledger.take()
            yield {"skipped": skipped, "__info__": news}


class Loader:
    """Iterable of batch dicts over one URL spec; see ``build_loader``."""

    def __init__(self, urls, cfg, tokenizer, train):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.train = train
        self.urls = expand_urls(urls)
        self.rank, self.world = rank_world()
        self.manifest = read_manifest(self.urls)
        self.epoch = 0
        self._consumed = set()
        self._batches = 0
        self._faults = Counter()
        self.num_samples = None
        if cfg.resampled:
            if not train:
                raise ValueError("resampled mode is for training; evaluation reads every sample once")
            self.num_samples = cfg.train_num_samples or (self.manifest or {}).get("num_samples")
            if not self.num_samples:
                raise ValueError("resampled mode needs train_num_samples or a %s/%s next to the shards of %r"
                                 % (shard_format.MANIFEST, shard_format.SIZES, self.urls[0]))
        elif self.manifest is None:
            log.warning("no %s/%s for %s...: sample count unknown, epochs are not checked for "
                        "missing samples", shard_format.MANIFEST, shard_format.SIZES, self.urls[0])
        workers = max(1, cfg.num_workers)
        if not cfg.resampled and len(self.urls) % (self.world * workers):
            log.warning("%d shards do not divide evenly over %d rank(s) x %d worker(s): ranks get "
                        "unequal sample counts", len(self.urls), self.world, workers)

    def _epoch_shards(self):
        """This rank's shards for the current epoch, without those consumed before a resume."""
        order = list(self.urls)
        if self.train:
            random.Random(derive_seed(self.cfg.seed, self.epoch)).shuffle(order)
        order = [u for u in order if u not in self._consumed]
        return order[self.rank::self.world] if self.world > 1 else order

    def _epoch_batches(self):
        """Resampled mode: (batches per rank per epoch, per worker)."""
        workers = max(1, self.cfg.num_workers)
        per_rank = math.ceil(self.num_samples / (self.cfg.batch_size * self.world))
        per_worker = math.ceil(per_rank / workers)
        return per_worker * workers, per_worker

    def expected_samples(self):
        """Media this rank should deliver in the current (remaining) epoch, or None if unknown."""
        if self.cfg.resampled or self.manifest is None:
            return None
        return sum(self.manifest["counts"][u] for u in self._epoch_shards())

    def __len__(self):
        """Batches the next iteration yields; TypeError when not known (items per media vary)."""
        if self.cfg.resampled:
            return self._epoch_batches()[0] - self._batches
        one_item_per_media = self.cfg.task == "retrieval" and (
            not self.train or self.cfg.caption_per_sample == "random")
        if self.manifest is None or not one_item_per_media:
            raise TypeError("length unknown: no manifest, or several items per sample "
                            "(use resampled mode with train_num_samples for a fixed length)")
        shards = self._epoch_shards()
        workers = max(1, self.cfg.num_workers)
        return sum(math.ceil(sum(self.manifest["counts"][u] for u in shards[w::workers]) / self.cfg.batch_size)
                   for w in range(workers))

    def set_epoch(self, epoch):
        if epoch != self.epoch:
            self.epoch = epoch
            self._consumed = set()
            self._batches = 0

    def faults(self):
        """Totals since construction: skipped samples per reason, and ``shard_retries``."""
        return dict(self._faults)

    def state_dict(self):
        """The resume position of this rank: epoch, shards fully delivered this epoch, batches
        this epoch. The engine merges every rank's consumed shards before saving, so any rank's
        saved state resumes the whole job."""
        return {"epoch": self.epoch, "consumed_shards": sorted(self._consumed), "batches": self._batches,
                "seed": self.cfg.seed}

    def load_state_dict(self, state):
        if state.get("seed", self.cfg.seed) != self.cfg.seed:
            log.warning("resuming with seed %s, the state was saved with seed %s: shard order differs",
                        self.cfg.seed, state["seed"])
        self.epoch = int(state["epoch"])
        self._consumed = set(state["consumed_shards"])
        self._batches = int(state["batches"])

    def __iter__(self):
        cfg = self.cfg
        workers = cfg.num_workers
        limit = worker_batches = None
        if cfg.resampled:
            limit = self._epoch_batches()[0] - self._batches
            worker_batches = math.ceil(limit / max(1, workers))
        expected = self.expected_samples()
        shards = self._epoch_shards()
        dataset = ShardStream(cfg, self.tokenizer, self.train, self.rank, shards, self.urls,
                              self.epoch, worker_batches, self._batches)
        if workers > 0 and "TOKENIZERS_PARALLELISM" not in os.environ:
            os.environ["TOKENIZERS_PARALLELISM"] = "false"  # tokenizers' threads and fork do not mix
        loader = DataLoader(
            dataset, batch_size=None, num_workers=workers,
            timeout=cfg.worker_timeout if workers > 0 else 0,
            generator=torch.Generator().manual_seed(derive_seed(cfg.seed, self.epoch, self.rank, self._batches)),
            persistent_workers=False)
        delivered = yielded = 0
        for batch in _reraise_worker_errors(loader, shards or self.urls):
            info = batch.pop("__info__")
            delivered += info["media"]
            if not cfg.resampled:  # shards drawn with replacement have no position to resume
                self._consumed.update(info["done_shards"])
            self._faults.update(batch["skipped"])
            if info["shard_retries"]:
                self._faults["shard_retries"] += info["shard_retries"]
            if "pixel_values" not in batch:
                continue
            self._batches += 1
            yielded += 1
            yield batch
            if limit is not None and yielded >= limit:
                break
        self._check(expected, delivered, len(shards))
        self.set_epoch(self.epoch + 1)

    def _check(self, expected, delivered, num_shards):
        if expected is None:
            return
        missing = expected - delivered
        if missing > self.cfg.missing_tolerance * expected:
            raise DataShortfallError(
                "epoch %d, rank %d: delivered %d of the %d samples the manifest lists for this rank's "
                "%d shard(s) (%d missing, %.2f%% > missing_tolerance %.2f%%); skipped so far: %s"
                % (self.epoch, self.rank, delivered, expected, num_shards, missing,
                   100.0 * missing / max(1, expected), 100.0 * self.cfg.missing_tolerance,
                   self.faults() or "none"))
        if missing < 0:
            log.warning("epoch %d, rank %d: delivered %d samples, more than the manifest's %d: "
                        "is the manifest stale?", self.epoch, self.rank, delivered, expected)


def _reraise_worker_errors(loader, urls):
    """Clearer errors from DataLoader workers: a worker's ShardError arrives wrapped in a
    traceback dump (raise it again with the URL first), and a worker timeout names no data."""
    it = iter(loader)
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except ShardError as exn:
            lines = [l for l in str(exn).splitlines() if l.startswith(("aurora_ds.data.loader.ShardError: ",
                                                                      "ShardError: "))]
            if not lines:
                raise
            raise ShardError(lines[-1].split(": ", 1)[1] + " (in a DataLoader worker)") from exn
        except RuntimeError as exn:
            if not str(exn).startswith("DataLoader timed out"):
                raise
            raise TimeoutError("%s while reading %d shard(s) starting %s; raise LoaderConfig.worker_timeout "
                               "if batches are legitimately this slow" % (exn, len(urls), urls[0])) from exn
        yield batch


def build_loader(urls, cfg, tokenizer=None, mode="train"):
    """An iterable of batch dicts over the shards of ``urls`` (a spec, see ``expand_urls``).

    ``mode`` is "train" (shuffled, augmented, one item per caption pair or question) or "eval"
    (in order, no augmentation; retrieval yields one entry per media with all its captions).
    The result has ``__len__`` when the length is known, ``set_epoch``, ``state_dict``,
    ``load_state_dict`` and ``faults``.
    """
    if mode not in ("train", "eval"):
        raise ValueError("mode must be 'train' or 'eval', got %r" % (mode,))
    if tokenizer is None and not (cfg.task == "retrieval" and mode == "eval"):
        raise ValueError("a tokenizer is needed for %s %s batches" % (cfg.task, mode))
    return Loader(urls, cfg, tokenizer, train=(mode == "train"))
