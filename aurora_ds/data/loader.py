"""WebDataset shards -> batches: split by node and worker, shuffle, decode, transform, tokenize.

Each DataLoader worker runs one straight pipeline of generators (``ShardStream.__iter__``):

    its shards -> tar samples -> items (one per caption/question) -> shuffle buffer
      -> decode + transform -> batches (tokenised)

Splitting: each epoch has one shard order (shuffled by seed and epoch in training). With at least
as many shards as ranks x workers ("slots"), each slot reads whole shards; with fewer, every slot
reads all shards and keeps every n-th sample (sample-level splitting), so no rank is left without
data. A training epoch that yields no batch on a rank is an error naming the rank, its shards, the
skipped samples and the remedy: an epoch loop never spins on empty epochs.

Exact resume: the stream of a slot is a function of (seed, epoch, rank, worker) alone. Every
random choice is seeded per item (caption choice, crop, flip, RandAugment, frame sampling), the
shuffle buffer and (resampled mode) the shard draws by the slot, and the main process takes
batches from the workers in a fixed round-robin order (not DataLoader's arrival order). The
resume position of a rank is therefore the number of items each worker had handed out up to its
last consumed batch, plus where the round-robin stood: a resumed worker re-reads its shards (or
redraws the same ones) from the start of the epoch, drops that many items before decoding
anything, and continues with the very same batches.

Sample faults (undecodable media, bad or missing json, missing fields, a member over
``max_member_mb``) are skipped and counted under their reason, wherever the sample sits in its
shard; a shard none of whose samples fits a layout the loader reads is a ``ShardError``. Shard
faults (missing, truncated, unreachable, frozen endpoint) are retried ``max_shard_retries``
times, then raise ``ShardError`` naming the URL. Retries resume after the samples already
delivered, so a retried shard never yields duplicates. An epoch's samples are each delivered or
skipped; those neither are missing, checked against the manifest (``missing_tolerance``).
"""

import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import time
from collections import Counter, deque
from itertools import groupby, islice
from operator import itemgetter
from typing import Optional

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from . import media, shard_format, storage, workers
from .text import pre_caption, pre_question, tokenize
from .shard_format import read_manifest
from .urls import expand_urls

log = logging.getLogger(__name__)
PREFETCH_FACTOR = 2  # DataLoader's default: batches each worker prepares ahead of the consumer


class ShardError(RuntimeError):
    """A shard could not be read after bounded retries, or none of its samples is in a layout the
    loader reads (the message names the URL)."""


class DataShortfallError(RuntimeError):
    """An epoch delivered or skipped fewer samples than the manifest lists, beyond ``missing_tolerance``."""

_BLIP_MEAN, _BLIP_STD = media.BLIP_MEAN, media.BLIP_STD


@dataclasses.dataclass
class LoaderConfig:
    """Everything the loader needs besides the URLs and the tokenizer.

    ``caption_per_sample`` is "random" (one pair per image or video per epoch, a random caption)
    or "all" (one pair per caption: BLIP's epoch). ``train_num_samples`` counts training items
    (caption pairs or questions) per epoch over all ranks: in resampled mode the epoch (default:
    the manifest's sample count); otherwise, when given, the length in place of the manifest's
    counts. ``frame_sampling`` applies in training; evaluation always samples uniformly.
    ``worker_timeout`` bounds the wait for one batch from a worker (0 disables); shard reads have
    their own, shorter timeouts. ``missing_tolerance`` is the fraction of the manifest's samples an
    epoch may miss (neither delivered nor skipped as faulty): 0 by default, as a skipped sample is
    counted, not missing. A tar member over ``max_member_mb`` is not read: its sample is skipped
    (``member_too_large``), so one huge member cannot grow a worker by its size.
    """

    task: str = "retrieval"
    media: str = "image"
    image_size: int = 384
    num_frames: int = 8
    frame_sampling: str = "uniform"
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
    max_member_mb: float = shard_format.MAX_MEMBER_MB
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
        check(math.isfinite(self.max_member_mb) and self.max_member_mb > 0,
              f"max_member_mb must be a positive finite number, got {self.max_member_mb}")
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


class EmptyEpochError(RuntimeError):
    """A rank's training epoch yielded no batch (no shards, or every sample skipped)."""


class Ledger:
    """Per-worker bookkeeping, handed to the main process with each batch.

    ``skipped`` and ``retries`` are deltas since the last batch; ``position`` (items taken from
    the shuffle buffer: delivered, or skipped while decoding, or a skipped sample's marker),
    ``media`` (samples delivered) and ``dropped`` (samples skipped) are cumulative over the epoch:
    they are this worker's resume position. Every skip is counted after the shuffle buffer, so a
    resumed worker, which drops the first ``position`` items, never counts a sample twice.
    """

    def __init__(self, position=0, media=0, dropped=0, board=None, worker=0, urls=()):
        self.skipped = Counter()
        self.retries = 0
        self.position = position
        self.media = media
        self.dropped = dropped
        self.warnings = RateLimitedWarnings()
        self.board, self.worker, self.urls = board, worker, {u: i for i, u in enumerate(urls)}
        self.batches = 0

    def reading(self, url):
        """Post on the workers' board which shard this worker reads (see ``workers.Board``)."""
        if self.board is not None:
            self.board.post(self.worker, workers.READING, shard=self.urls.get(url, -1), batches=self.batches)

    def skip(self, item, reason, detail):
        self.skipped[reason] += 1
        self.dropped += int(item.get("__first__", False))
        self.warnings.warn(reason, "%s in %s: %s" % (item.get("__key__"), item["__shard__"], detail))

    def deliver(self, item):
        self.media += int(item.get("__first__", False))

    def take(self, worker, end=False):
        """(skipped, info) for the batch being sent."""
        if not end:
            self.batches += 1
            if self.board is not None:
                self.board.post(self.worker, workers.BATCHES, batches=self.batches)
        skipped = dict(self.skipped)
        info = {"worker": worker, "position": self.position, "media": self.media, "dropped": self.dropped,
                "shard_retries": self.retries, "end": end}
        self.skipped, self.retries = Counter(), 0
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


def open_shard(url):
    """``url`` opened for reading, or the exception opening it raised (for ``read_shard`` to retry)."""
    try:
        return storage.open_url(url, "rb")
    except Exception as exn:
        return exn


def read_shard(url, cfg, ledger, opened=None, after_sample=None):
    """The samples of one shard; read errors are retried (``cfg.max_shard_retries``), skipping
    samples already delivered. ``opened`` (from ``open_shard``) serves the first attempt;
    ``after_sample(stream)`` is called after each sample delivered."""
    delivered = 0
    max_retries = cfg.max_shard_retries
    ledger.reading(url)
    for attempt in range(max_retries + 1):
        try:
            stream = opened if attempt == 0 and opened is not None else storage.open_url(url, "rb")
            if isinstance(stream, Exception):
                raise stream
            complete = False
            try:
                for i, sample in enumerate(shard_format.iter_tar_samples(
                        stream, max_member_bytes=int(cfg.max_member_mb * 2**20))):
                    if i >= delivered:
                        delivered += 1
                        sample["__shard__"] = url
                        yield sample
                        if after_sample is not None:
                            after_sample(stream)
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


def read_shards(urls, cfg, ledger):
    """The samples of ``urls`` in order. The next S3 shard is opened as soon as the current one has
    been fetched to its end (its read-ahead reached it): its request and first bytes are then
    under way while the current shard's last samples are decoded, instead of one round trip per
    shard in the worker's path, and a stream opened ahead never idles for long (an endpoint may
    drop a connection nobody reads). Other streams open when needed (curl, for one, gives up on
    a pipe nobody reads)."""
    urls = iter(urls)
    url, ahead, following = next(urls, None), None, None

    def open_following(stream):
        nonlocal ahead
        if ahead is None and following is not None and getattr(stream, "fetched", False):
            ahead = open_shard(following)

    try:
        while url is not None:
            opened, ahead, following = ahead, None, next(urls, None)
            yield from read_shard(url, cfg, ledger, opened, open_following)
            url = following
    finally:
        if ahead is not None and not isinstance(ahead, Exception):
            _close_quietly(ahead)


def every_nth(samples, stride, offset):
    """Sample-level splitting: the samples whose index in the epoch's stream is offset mod stride."""
    for i, sample in enumerate(samples):
        if i % stride == offset:
            yield sample


def resampled_urls(urls, rng):
    """Shards drawn with replacement, forever (epochs are cut by a batch count)."""
    while True:
        yield rng.choice(urls)


def sample_items(sample, cfg, train, rng):
    """One shard sample -> its items: caption pairs, one eval entry, or one item per question."""
    if shard_format.TOO_LARGE in sample:
        raise SampleError("member_too_large", ", ".join(
            "%s.%s is %d bytes, over max_member_mb=%g" % (sample[shard_format.KEY], ext, size, cfg.max_member_mb)
            for ext, size in sample[shard_format.TOO_LARGE].items()))
    ext = shard_format.media_field(sample, cfg.media)
    if ext is None:
        exts = shard_format.IMAGE_EXTS if cfg.media == "image" else shard_format.VIDEO_EXTS
        raise SampleError("missing_field", "no %s member" % "/".join(exts))
    if sample.get("__layout__") == shard_format.IMG2DATASET:
        if shard_format.TXT not in sample:
            raise SampleError("missing_field", "no txt member")
        try:
            meta = shard_format.img2dataset_meta(sample)
        except UnicodeDecodeError as exn:
            raise SampleError("bad_text", str(exn))
    elif shard_format.JSON not in sample:
        raise SampleError("missing_field", "no json member")
    else:
        try:
            meta = json.loads(sample[shard_format.JSON])
        except ValueError as exn:  # UnicodeDecodeError is one
            raise SampleError("bad_json", str(exn))
        if not isinstance(meta, dict):
            raise SampleError("bad_json", "not a JSON object: %s" % type(meta).__name__)
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
                if train and not total:  # a test split's question: nothing to learn from
                    continue
                items.append(dict(base, question=pre_question(question, cfg.max_words),
                                  question_id=question_id, answers=list(counts),
                                  answer_weights=[n / total for n in counts.values()]))
            if not items:
                raise SampleError("missing_field", "no questions" + (" with answers" if train else ""))
    except (KeyError, TypeError, AttributeError) as exn:  # absent or wrongly typed field
        raise SampleError("missing_field", "json field: %s: %s" % (type(exn).__name__, exn))
    items[0]["__first__"] = True
    return items


def check_layouts(samples, cfg, kind):
    """Marks each sample with the layout it fits (``shard_format.sample_layout``); one that fits
    none is skipped later under its fault's reason, wherever it sits in its shard. A shard none of
    whose samples fits is in a layout the loader cannot read (say, img2dataset images given to a
    QA task): a ShardError naming the shard, its first sample's members, what was expected and
    ``kind``, the kind its manifest declares. Runs before sample-level splitting, so that every
    slot judges a shard on all its samples."""
    for shard, group in groupby(samples, itemgetter("__shard__")):
        fitted, count, first = False, 0, None
        for sample in group:
            sample["__layout__"] = shard_format.sample_layout(sample, cfg.media, cfg.task)
            # an oversized member is a fault of its sample, whatever the layout
            fitted = fitted or sample["__layout__"] is not None or shard_format.TOO_LARGE in sample
            count += 1
            first = first or "the first, %r, holds %s" % (sample[shard_format.KEY],
                                                          shard_format.sample_members(sample) or "nothing")
            yield sample
        if not fitted:
            raise ShardError("shard %s is in a layout the loader cannot read: none of its %d sample(s) fits; %s; "
                             "expected %s; %s" % (
                                 shard, count, first, shard_format.expected_layout(cfg.media, cfg.task),
                                 "its %s declares kind %r" % (shard_format.MANIFEST, kind) if kind
                                 else "no %s declares its kind" % shard_format.MANIFEST))


def expand_items(samples, cfg, train, epoch, ledger):
    """Items with their own seed: the random choices made for an item (caption, crop, frames)
    depend on the seed, the epoch and the item, never on which worker or when it is read.

    A faulty sample becomes one marker item (``__fault__``), counted where items are decoded:
    after the shuffle buffer, where a resumed worker drops what it had already handed out."""
    for sample in samples:
        seed = derive_seed(cfg.seed, epoch, sample["__shard__"], sample.get(shard_format.KEY))
        try:
            items = sample_items(sample, cfg, train, random.Random(seed))
        except SampleError as exn:
            items = [{"__shard__": sample["__shard__"], "__key__": sample.get(shard_format.KEY),
                      "__first__": True, "__fault__": (exn.reason, str(exn))}]
        for i, item in enumerate(items):
            item["__seed__"] = derive_seed(seed, i)
        yield from items


def skip_items(items, n, ledger):
    """Drop the first ``n`` items (already delivered before a resume) and count every item taken."""
    for i, item in enumerate(items):
        ledger.position = max(ledger.position, i + 1)
        if i >= n:
            yield item


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


def decode_items(items, cfg, transform, sampling, ledger):
    for item in items:
        if "__fault__" in item:
            ledger.skip(item, *item["__fault__"])
            continue
        try:
            data = item.pop("media")
            rng = random.Random(item["__seed__"])
            if cfg.media == "image":
                pixels = media.decode_image(data)
            else:
                pixels = media.decode_video(data, cfg.num_frames, sampling, rng)
            with torch.random.fork_rng(devices=[]):  # torchvision's random transforms draw from torch
                torch.manual_seed(item["__seed__"])
                item["pixel_values"] = transform(pixels).as_subclass(torch.Tensor)
        except Exception as exn:  # any decoder error means this sample's bytes are bad
            ledger.skip(item, "decode_" + cfg.media, "%s: %s" % (type(exn).__name__, exn))
            continue
        yield item


def collate(items, cfg, tokenizer, train, ledger, worker):
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
    batch["skipped"], batch["__info__"] = ledger.take(worker)
    return batch


def batches(items, cfg, tokenizer, train, ledger, worker):
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == cfg.batch_size:
            yield collate(chunk, cfg, tokenizer, train, ledger, worker)
            chunk = []
    if chunk:
        yield collate(chunk, cfg, tokenizer, train, ledger, worker)


@dataclasses.dataclass
class EpochPlan:
    """Which data each slot (rank, worker) of this epoch reads.

    ``shards`` is the rank's list (whole-shard splitting: the worker takes ``shards[w::workers]``)
    or, with sample-level splitting (``stride`` > 1 and fewer shards than slots), every shard of
    the epoch, of which slot ``rank * workers + w`` keeps every ``stride``-th sample.
    """

    shards: list
    workers: int
    stride: int = 1
    rank: int = 0

    @property
    def sample_level(self):
        return self.stride > 1

    def worker_shards(self, worker):
        return list(self.shards) if self.sample_level else self.shards[worker::self.workers]

    def offset(self, worker):
        return self.rank * self.workers + worker


def epoch_plan(urls, seed, epoch, train, rank, world, workers):
    order = list(urls)
    if train:
        random.Random(derive_seed(seed, epoch)).shuffle(order)
    slots = world * workers
    if len(order) >= slots or slots == 1:
        return EpochPlan(order[rank::world], workers)
    return EpochPlan(order, workers, stride=slots, rank=rank)


class ShardStream(IterableDataset):
    """What one DataLoader worker runs. Picklable: plain attributes, module-level stages."""

    def __init__(self, cfg, tokenizer, train, rank, plan, all_shards, epoch, worker_batches, positions, board=None,
                 kind=None):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.train = train
        self.rank = rank
        self.plan = plan
        self.all_shards = all_shards
        self.epoch = epoch
        self.worker_batches = worker_batches  # per worker: batches left to make (resampled mode), else None
        self.positions = positions  # per worker: [items taken, media delivered, ended, samples skipped]
        self.board = board  # where workers post their phase (None without workers)
        self.kind = kind  # the shards' kind by their manifest (None if unknown), for errors

    def __iter__(self):
        cfg = self.cfg
        info = get_worker_info()
        worker = info.id if info is not None else 0
        position, media_count, ended, dropped = self.positions[worker]
        ledger = Ledger(position, media_count, dropped, self.board, worker, self.all_shards)
        if ended:
            skipped, news = ledger.take(worker, end=True)
            yield {"skipped": skipped, "__info__": news}
            return
        shuffle_rng = random.Random(derive_seed(cfg.seed, self.epoch, self.rank, worker, "shuffle"))
        if cfg.resampled:
            rng = random.Random(derive_seed(cfg.seed, self.epoch, self.rank, worker))
            urls = resampled_urls(self.all_shards, rng)
        else:
            urls = self.plan.worker_shards(worker)
        stream = check_layouts(read_shards(urls, cfg, ledger), cfg, self.kind)
        if not cfg.resampled and self.plan.sample_level:
            stream = every_nth(stream, self.plan.stride, self.plan.offset(worker))
        augment = self.train and cfg.augment
        transform = media.build_transform(cfg.image_size, augment, cfg.mean, cfg.std, cfg.resample)
        sampling = cfg.frame_sampling if augment else "uniform"

        stream = expand_items(stream, cfg, self.train, self.epoch, ledger)
        if self.train and cfg.shuffle_buffer > 1:
            stream = shuffle(stream, cfg.shuffle_buffer, shuffle_rng)
        stream = skip_items(stream, position, ledger)
        stream = decode_items(stream, cfg, transform, sampling, ledger)
        stream = batches(stream, cfg, self.tokenizer, self.train, ledger, worker)
        if self.worker_batches is not None:
            stream = islice(stream, self.worker_batches[worker])
        yield from stream
        skipped, news = ledger.take(worker, end=True)  # also what happened after the last batch
        yield {"skipped": skipped, "__info__": news}


def _duplicates(urls):
    return sorted(u for u, n in Counter(urls).items() if n > 1)


class Loader:
    """Iterable of batch dicts over one URL spec; see ``build_loader``."""

    def __init__(self, urls, cfg, tokenizer, train):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.train = train
        self.urls = expand_urls(urls)
        twice = _duplicates(self.urls)
        if twice and not train:
            raise ValueError("the evaluation spec names %d shard(s) more than once (%s): their media would be "
                             "counted twice; list each shard once" % (len(twice), ", ".join(twice[:3])))
        if twice:
            log.warning("the training spec names %d shard(s) more than once (%s): their samples are read "
                        "that many times per epoch", len(twice), ", ".join(twice[:3]))
        self.rank, self.world = rank_world()
        self.workers = max(1, cfg.num_workers)
        self.manifest = read_manifest(self.urls)
        self.epoch = 0
        self._batches = 0
        self._faults = Counter()
        self._ahead = None  # (epoch, batches, plan, arrivals): an epoch whose workers already run
        self.last_epoch = None  # set by a caller that knows it: no epoch after it is started early
        self._reset_position()
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
        slots = self.world * self.workers
        if not cfg.resampled and len(self.urls) < slots:
            log.warning("%d shard(s) for %d rank(s) x %d worker(s): splitting by sample (every slot reads every "
                        "shard and keeps every %d-th sample); more shards read faster%s",
                        len(self.urls), self.world, self.workers, slots,
                        "; the %s per epoch are estimated in proportion to each slot's samples" % self._pair_field()
                        if train and self._pair_field() else "")
        elif not cfg.resampled and len(self.urls) % slots:
            log.warning("%d shards do not divide evenly over %d rank(s) x %d worker(s): ranks get "
                        "unequal sample counts", len(self.urls), self.world, self.workers)

    def _reset_position(self):
        self._positions = [[0, 0, False, 0] for _ in range(self.workers)]
        self._next_worker = 0

    def plan(self):
        """This rank's share of the current epoch (an ``EpochPlan``)."""
        return epoch_plan(self.urls, self.cfg.seed, self.epoch, self.train, self.rank, self.world, self.workers)

    def _worker_samples(self, plan, worker, counts=None):
        """What the manifest lists for one worker's share of the epoch: samples, or with
        ``counts`` ({url: n} per shard) that many items. With sample-level splitting the items are
        shared in proportion to the samples the worker keeps: an estimate, as the manifest does
        not say which samples hold how many captions or questions."""
        media = self.manifest["counts"]
        if not plan.sample_level:
            return sum((counts or media)[u] for u in plan.worker_shards(worker))
        total = sum(media[u] for u in plan.shards)
        kept = max(0, (total - plan.offset(worker) + plan.stride - 1) // plan.stride)
        if counts is None:
            return kept
        return sum(counts[u] for u in plan.shards) * kept // max(1, total)

    def _pair_field(self):
        """The manifest's per-shard count of this loader's items: None for one item per sample
        (evaluation of retrieval, one random caption per sample), else "captions" or "questions"."""
        if self.cfg.task == "qa":
            return "questions"
        return "captions" if self.train and self.cfg.caption_per_sample == "all" else None

    def _item_counts(self):
        """{url: items this loader makes of the shard} from the manifest; TypeError saying why
        when the manifest does not tell."""
        if self.manifest is None:
            raise TypeError("no %s/%s next to the shards of %r" % (shard_format.MANIFEST, shard_format.SIZES,
                                                                   self.urls[0]))
        field = self._pair_field()
        if field is not None and self.manifest[field] is None:
            raise TypeError("the %s next to the shards of %r has no per-shard %r counts (a sizes.json, or a "
                            "manifest from an older aurora-shard): re-run aurora-shard convert to write them"
                            % (shard_format.MANIFEST, self.urls[0], field))
        return self.manifest["counts"] if field is None else self.manifest[field]

    def describe(self):
        """This rank's data in words (for errors): its shards and what the manifest says of them."""
        plan = self.plan()
        shards = plan.shards
        text = "rank %d of %d reads %d of %d shard(s)%s" % (
            self.rank, self.world, len(shards), len(self.urls),
            " (%s%s)" % (", ".join(shards[:3]), ", ..." if len(shards) > 3 else "") if shards else "")
        if plan.sample_level:
            text += ", keeping every %d-th sample per worker" % plan.stride
        if self.manifest is not None and not self.cfg.resampled:
            text += ", %d sample(s) by the manifest" % sum(self._worker_samples(plan, w) for w in range(self.workers))
        return text

    def _epoch_batches(self):
        """Resampled mode: (batches per rank per epoch, per worker)."""
        per_rank = math.ceil(self.num_samples / (self.cfg.batch_size * self.world))
        per_worker = math.ceil(per_rank / self.workers)
        return per_worker * self.workers, per_worker

    def expected_samples(self):
        """Samples this rank should deliver or skip in the whole current epoch, or None if unknown."""
        if self.cfg.resampled or self.manifest is None:
            return None
        plan = self.plan()
        return sum(self._worker_samples(plan, w) for w in range(self.workers))

    def __len__(self):
        """Batches of a whole epoch on this rank, counted from the manifest: samples, captions
        (``caption_per_sample="all"``) or questions; from ``train_num_samples`` when given.
        TypeError saying why when not known."""
        if self.cfg.resampled:
            return self._epoch_batches()[0] - self._batches
        if self.train and self.cfg.train_num_samples:
            return math.ceil(self.cfg.train_num_samples / (self.cfg.batch_size * self.world))
        counts = self._item_counts()
        plan = self.plan()
        return sum(math.ceil(self._worker_samples(plan, w, counts) / self.cfg.batch_size) for w in range(self.workers))

    def prefetch(self):
        """Start reading the current epoch now: its workers start and prefetch, and the next
        iteration takes their batches. A training loop calls it before building its model, so
        that the workers' start-up (fork, first connections, shuffle buffer, first batches)
        overlaps the build instead of the first step. Without workers it does nothing."""
        if self.cfg.num_workers > 0 and self._ahead is None:
            self._ahead = (self.epoch, self._batches, *self._open(self.epoch, self._batches, self._positions))

    def _open(self, epoch, batches, positions):
        """(plan, arrivals) of ``epoch`` resumed after ``batches`` batches at the workers'
        ``positions``: the DataLoader's workers are started here and begin prefetching."""
        cfg = self.cfg
        worker_batches = None
        if cfg.resampled:  # every worker makes the same number of batches, taken in turn from worker 0
            per_worker = self._epoch_batches()[1]
            worker_batches = [per_worker - (batches - w + self.workers - 1) // self.workers
                              for w in range(self.workers)]
        plan = epoch_plan(self.urls, cfg.seed, epoch, self.train, self.rank, self.world, self.workers)
        ctx = workers.context() if cfg.num_workers > 0 else None
        board = workers.Board(ctx, cfg.num_workers) if ctx is not None else None
        dataset = ShardStream(cfg, self.tokenizer, self.train, self.rank, plan, self.urls, epoch, worker_batches,
                              [list(p) for p in positions], board, (self.manifest or {}).get("kind"))
        loader = DataLoader(
            dataset, batch_size=None, num_workers=cfg.num_workers,
            timeout=cfg.worker_timeout if cfg.num_workers > 0 else 0,
            prefetch_factor=PREFETCH_FACTOR if cfg.num_workers > 0 else None,
            generator=torch.Generator().manual_seed(derive_seed(cfg.seed, epoch, self.rank)),
            multiprocessing_context=ctx, worker_init_fn=workers.WorkerInit(board) if ctx else None,
            persistent_workers=False)
        return plan, _reraise_worker_errors(iter(loader), plan.shards or self.urls, board, self.urls)

    def _batches_left(self):
        """Batches left in the current epoch by the manifest (an estimate with sample-level
        splitting), or None when unknown."""
        try:
            n = len(self)
        except TypeError:
            return None
        return n if self.cfg.resampled else n - self._batches

    def set_epoch(self, epoch):
        if self._ahead is not None and self._ahead[0] != epoch:
            self._ahead = None  # (its workers stop)
        if epoch != self.epoch:
            self.epoch = epoch
            self._batches = 0
            self._reset_position()

    def faults(self):
        """Totals since construction: skipped samples per reason, and ``shard_retries``."""
        return dict(self._faults)

    def state_dict(self):
        """The resume position of this rank: epoch, batches this epoch, per worker the items it
        had handed out, the media it had delivered, whether it had ended and the samples it had
        skipped, up to its last consumed batch, and the worker the next batch comes from."""
        return {"epoch": self.epoch, "batches": self._batches, "seed": self.cfg.seed, "rank": self.rank,
                "world_size": self.world, "workers": self.workers,
                "positions": [list(p) for p in self._positions], "next_worker": self._next_worker}

    def load_state_dict(self, state):
        if state.get("seed", self.cfg.seed) != self.cfg.seed:
            log.warning("resuming with seed %s, the state was saved with seed %s: shard order differs",
                        self.cfg.seed, state["seed"])
        self.epoch = int(state["epoch"])
        self._ahead = None
        self._reset_position()
        layout = (state.get("rank"), state.get("world_size"), state.get("workers"))
        if "positions" not in state or layout != (self.rank, self.world, self.workers):
            log.warning("the saved data position is for rank %s of %s with %s worker(s), this is rank %d of %d "
                        "with %d: epoch %d restarts from its beginning", *layout, self.rank, self.world,
                        self.workers, self.epoch)
            self._batches = 0
            return
        self._batches = int(state["batches"])
        # (a state saved before skipped samples were counted has no fourth entry)
        self._positions = [[int(p[0]), int(p[1]), bool(p[2]), int(p[3]) if len(p) > 3 else 0]
                           for p in state["positions"]]
        self._next_worker = int(state["next_worker"])

    def __iter__(self):
        cfg = self.cfg
        limit = self._epoch_batches()[0] - self._batches if cfg.resampled else None
        expected = self.expected_samples()
        left = self._batches_left() if self.train and cfg.num_workers > 0 else None
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[:2] == (self.epoch, self._batches):
            plan, arrivals = ahead[2:]
        else:
            plan, arrivals = self._open(self.epoch, self._batches, self._positions)
        yielded = 0
        for batch in _round_robin(arrivals, self.workers, self._positions, self._next_worker):
            info = batch.pop("__info__")
            w = info["worker"]
            self._faults.update(batch["skipped"])
            if info["shard_retries"]:
                self._faults["shard_retries"] += info["shard_retries"]
            self._positions[w] = [info["position"], info["media"], info["end"], info["dropped"]]
            if "pixel_values" not in batch:
                continue
            self._batches += 1
            self._next_worker = (w + 1) % self.workers
            yielded += 1
            yield batch
            if limit is not None and yielded >= limit:
                break
            if (left is not None and self._ahead is None and left - yielded <= PREFETCH_FACTOR * self.workers
                    and (self.last_epoch is None or self.epoch < self.last_epoch)):
                # The current epoch's workers have produced (about) everything: start the next
                # epoch's now, so that their start-up overlaps this epoch's last steps.
                self._ahead = (self.epoch + 1, 0, *self._open(self.epoch + 1, 0, [[0, 0, False, 0]] * self.workers))
        delivered = sum(p[1] for p in self._positions)
        skipped = sum(p[3] for p in self._positions)
        if self.train and self._batches == 0 and not cfg.resampled:
            raise EmptyEpochError(
                "epoch %d gave no training batch on rank %d: %s; skipped: %s. Remedy: give at least one "
                "readable sample per rank (use more shards than ranks x data.num_workers, or fewer "
                "ranks), and check that the shards are in the expected layout" % (
                    self.epoch, self.rank, self.describe(), self.faults() or "none"))
        self._check(expected, delivered, skipped, len(plan.shards))
        self.set_epoch(self.epoch + 1)

    def _check(self, expected, delivered, skipped, num_shards):
        """Samples neither delivered nor skipped (as faulty, counted by reason) are missing: a
        shard cut short, a stale manifest. More than ``missing_tolerance`` of them is an error."""
        if expected is None:
            return
        missing = expected - delivered - skipped
        if missing > self.cfg.missing_tolerance * expected:
            raise DataShortfallError(
                "epoch %d, rank %d: delivered %d and skipped %d of the %d samples the manifest lists for this "
                "rank's %d shard(s) (%d missing, %.2f%% > missing_tolerance %.2f%%); skipped so far: %s"
                % (self.epoch, self.rank, delivered, skipped, expected, num_shards, missing,
                   100.0 * missing / max(1, expected), 100.0 * self.cfg.missing_tolerance,
                   self.faults() or "none"))
        if missing < 0:
            log.warning("epoch %d, rank %d: delivered %d and skipped %d samples, more than the manifest's %d: "
                        "is the manifest stale?", self.epoch, self.rank, delivered, skipped, expected)


def _round_robin(arrivals, workers, positions, next_worker):
    """The workers' batches in a fixed order: worker ``next_worker``, then the next, ... skipping
    workers that have ended, whatever order DataLoader delivers them in. End markers (and any
    news they carry) pass through as info-only batches."""
    queues = [deque() for _ in range(workers)]
    active = [not p[2] for p in positions]
    w = next_worker % workers
    while any(active):
        if not active[w]:
            w = (w + 1) % workers
            continue
        while not queues[w]:
            batch = next(arrivals, None)
            if batch is None:  # DataLoader is done: every worker has ended
                return
            queues[batch["__info__"]["worker"]].append(batch)
        batch = queues[w].popleft()
        if batch["__info__"]["end"]:
            active[w] = False
            yield batch
            continue
        yield batch
        w = (w + 1) % workers
    for q in queues:  # end markers of workers that had ended before a resume
        yield from q
    for batch in arrivals:
        yield batch


def _reraise_worker_errors(it, shards, board, urls):
    """Clearer errors from a DataLoader iterator's workers: a worker's ShardError arrives wrapped in
    a traceback dump (raise it again with the URL first), and a worker timeout names no data
    (name the shards and what each worker was doing; the workers print their stacks)."""
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
            states = workers.diagnose(getattr(it, "_workers", []), board, urls)
            raise TimeoutError("%s while reading %d shard(s) starting %s; %s; raise LoaderConfig.worker_timeout if "
                               "batches are legitimately this slow" % (exn, len(shards), shards[0],
                                                                      "; ".join(states) or "no worker alive")) from exn
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
