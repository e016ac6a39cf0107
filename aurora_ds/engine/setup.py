"""Each run is set up once, before any backbone is built: ``prepare`` resolves and checks the
backbone spec, checkpoint (its architecture against the task), tokenizer, special tokens,
preprocessing, shards (a directory with ``sizes.json`` stands for its shards; their kind against
the task), DeepSpeed config and the run record, for training and evaluation alike.

Building a BLIP-2 backbone takes minutes; every mistake found here takes seconds. Errors name
the config key or flag and the path; every rank checks what it sees (nodes may have disks of
their own) and all stop together, and the CLIs say the error once (``dist.fail_once``).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..backbones import BackboneSpec, backbone_config, checkpoint_architectures, checkpoint_identity, get_spec
from ..dist import (barrier, free_port, process_rank, set_compute_device, stop_if_any_rank_failed,
                    use_current_collectives, world)
from .adapter_record import AdapterRecord, check_checkpoint, check_evaluation, check_fits, read_record
from .backend import CAPTURED
from .checkpoint import find_checkpoint, verify_checkpoint
from .dsconfig import build_ds_config, gpus_per_node
from .rundir import CHECKPOINT_ADAPTER, RunDir

# The shard kind (manifest.json's ``kind``, written by aurora-shard) each (task, media) reads.
SHARD_KINDS = {("retrieval", "image"): "image", ("retrieval", "video"): "video",
               ("qa", "image"): "image_qa", ("qa", "video"): "video_qa"}
SHARD_FLAGS = {"data.train_shards": "--train-shards", "data.eval_shards": "--eval-shards",
               "data.test_shards": "--test-shards"}


@dataclass
class RunSetup:
    """What a run is, resolved: everything the build and the loop read."""

    spec: BackboneSpec
    config: object  # the backbone's transformers config: the checkpoint's, else the registry shape
    rank: int
    size: int
    ds_config: dict | None
    layout: str | None
    image_size: int
    tokenizer: object = None  # None for synthetic data
    tokenizer_used: tuple[str, str] | None = None  # (config key or how trained, directory)
    trained: bool = False  # the tokenizer was trained on the run's text
    special: object = None  # BLIP's SpecialTokens, checked against the config
    record: AdapterRecord | None = None  # what this run's adapters record (training)
    checkpoint: Path | None = None  # the checkpoint a training run resumes from
    notes: list[str] = field(default_factory=list)  # said once by the run's logger


def say(message: str) -> None:
    """A line on stderr from rank 0 only."""
    if process_rank() == 0:
        print(message, file=sys.stderr, flush=True)


def setup_distributed(cfg) -> tuple[int, int]:
    """DeepSpeed picks gloo on CPU and nccl on GPU by itself; the plain path is one process."""
    if cfg.engine.deepspeed:
        import deepspeed

        if "RANK" not in os.environ:  # started without a launcher: a 1-rank group on this host
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(free_port()))
        from datetime import timedelta

        # Bounds every wait across ranks: a rank that died or hangs cannot hold the others forever.
        deepspeed.init_distributed(timeout=timedelta(seconds=cfg.engine.collective_timeout_s))
        use_current_collectives()
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        else:
            release_shm_buffer()
    elif int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("--no-deepspeed is the single-process reference path; launch it without a launcher")
    set_compute_device(torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu")
    return world()


def release_shm_buffer():
    """DeepSpeed's CPU shared-memory allreduce creates one RAM-backed ``/dev/shm`` file per rank
    (66 MB) and never removes it: every run would leak them. Once every rank has passed
    ``init_distributed`` (a barrier), all of them have mapped all the files, so each rank unlinks
    its own now: the mappings stay valid and nothing is left behind, even by a killed run."""
    path = Path("/dev/shm") / (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR')}_"
                               f"{os.environ.get('MASTER_PORT')}_{process_rank()}")
    barrier()
    path.unlink(missing_ok=True)


def deepspeed_config(cfg, size: int) -> tuple[dict | None, str | None, str]:
    """The run's DeepSpeed config and its layout name (None, None on the plain path); ``auto``
    takes aurora-plan's recommended layout for this backbone and world, and says which and why."""
    if not cfg.engine.deepspeed:
        return None, None, ""
    layout, note = cfg.engine.ds_config, ""
    if layout == "auto":
        from ..plan import choose_layout

        choice = choose_layout(cfg, size, gpus_per_node(size))
        layout, note = choice["ds_config"], f"[aurora] --ds-config auto: {choice['ds_config']} ({choice['reason']})"
    return build_ds_config(layout, cfg, size), layout, note


def check_backbone(cfg) -> BackboneSpec:
    """The backbone must serve the task (and engine.compile=on capture its step); returns its spec."""
    spec = get_spec(cfg.backbone.name)
    if spec.task not in ("retrieval", "vqa"):
        raise ValueError(f"backbone {cfg.backbone.name} is a {spec.task} model: aurora-train needs a retrieval or VQA "
                         "backbone (use the Python API to adapt it inside your own model)")
    if (spec.task == "vqa") != (cfg.objective.task == "qa"):
        raise ValueError(f"objective.task={cfg.objective.task} does not fit backbone {cfg.backbone.name}, a {spec.task} model")
    if cfg.engine.compile == "on" and (spec.interface, cfg.objective.task) not in CAPTURED:
        raise ValueError(f"engine.compile=on captures the step of {sorted(CAPTURED)} (model interface, task) only; "
                         f"{cfg.backbone.name} is ({spec.interface!r}, {cfg.objective.task!r}): set engine.compile=off or auto")
    return spec


def check_checkpoint_dir(cfg, spec: BackboneSpec):
    """The checkpoint has a readable config.json of the class the task loads: a VQA checkpoint
    under a retrieval recipe (or the reverse) would start with random task heads, silently."""
    backbone_config(cfg.backbone.name, cfg.backbone.checkpoint)
    found, wanted = checkpoint_architectures(cfg.backbone.checkpoint), spec.extra.get("model_class")
    if found and wanted and wanted not in found:
        raise ValueError(f"backbone.checkpoint={cfg.backbone.checkpoint}: its config.json has architectures {found}, "
                         f"but this {cfg.objective.task} run (backbone.name={cfg.backbone.name}"
                         f"{f', recipe {cfg.recipe}' if cfg.recipe else ''}) loads a {wanted}: use a checkpoint of "
                         f"the run's task, or the recipe of the checkpoint's")


def check_tokenizer_given(cfg):
    """A pretrained checkpoint must bring its tokenizer: ids from one trained on the captions
    would index its embedding at random. Training one is for random weights, and explicit."""
    from ..backbones.tokenizer import has_tokenizer

    if cfg.backbone.tokenizer:
        if not os.path.isdir(cfg.backbone.tokenizer):
            raise FileNotFoundError(f"backbone.tokenizer={cfg.backbone.tokenizer}: tokenizer directory does not exist")
        if not has_tokenizer(cfg.backbone.tokenizer):
            raise FileNotFoundError(f"backbone.tokenizer={cfg.backbone.tokenizer}: no tokenizer.json or vocab.txt there")
    elif (cfg.data.source == "shards" and cfg.backbone.checkpoint and not cfg.backbone.train_tokenizer
          and not has_tokenizer(cfg.backbone.checkpoint)):
        raise FileNotFoundError(
            f"backbone.checkpoint={cfg.backbone.checkpoint}: no tokenizer there (no tokenizer.json or vocab.txt beside "
            "the model): save the tokenizer the model was trained with beside it (processor.save_pretrained(DIR) or "
            "tokenizer.save_pretrained(DIR)), or set backbone.tokenizer=DIR; only for random weights, set "
            "backbone.train_tokenizer=true to train one on the captions")


def resolve_shard_dirs(cfg, keys) -> list[str]:
    """A shard spec that is a directory (local or ``s3://``) holding ``sizes.json`` or
    ``manifest.json`` stands for the shards they list, as ``aurora-shard verify DIR`` reads it;
    rewritten in ``cfg`` as an explicit spec. Returns what was resolved, to be said."""
    from ..data import shard_format
    from ..data.storage import is_s3

    said = []
    for key in keys:
        section, name = key.split(".")
        spec = getattr(getattr(cfg, section), name)
        if not spec or "{" in spec or "::" in spec or spec.endswith(".tar"):
            continue
        if not (is_s3(spec) or os.path.isdir(spec)):
            continue
        folder = spec.rstrip("/")
        found = shard_format.folder_entries(folder)
        if found is None:
            raise FileNotFoundError(f"{key}={spec} is a directory without {shard_format.SIZES} or "
                                    f"{shard_format.MANIFEST}: give its shards as a brace spec, e.g. "
                                    f"{folder}/name-{{000000..000009}}.tar")
        names = sorted(found[1])
        setattr(getattr(cfg, section), name, "::".join(shard_format.join(folder, n) for n in names))
        said.append(f"[aurora] {key}={spec}: its {len(names)} shard(s) as {folder}/{shard_format.SIZES} lists them")
    return said


def check_shard_kinds(cfg, names: dict, adapter=None):
    """The shards' kind (their manifest.json) must be what the task reads; QA training shards
    must have answers (answers.json): a split without annotations (VQAv2 test-dev) has none."""
    from ..data import shard_format

    wanted = SHARD_KINDS[cfg.objective.task, cfg.data.media]
    run = (f"adapter {adapter} was trained for" if adapter else
           f"recipe {cfg.recipe or '(none: the defaults)'} trains") + f" {cfg.objective.task} on {cfg.data.media}"
    for key, name in names.items():
        spec = getattr(cfg.data, key.split(".")[1])
        if not spec or spec.startswith("pipe:"):
            continue
        found = shard_format.read_manifest(spec)
        kind = (found or {}).get("kind")
        where = f"{key} ({SHARD_FLAGS[key]})" if name == key else name
        if kind and kind != wanted:
            fix = ("--recipe vqa / msrvtt_qa for QA shards" if kind.endswith("_qa")
                   else "QA shards (aurora-shard convert vqa ...) or a retrieval recipe")
            raise ValueError(f"{where}={spec}: its {shard_format.MANIFEST} says kind {kind!r}, but {run}, which reads "
                             f"{wanted!r} shards: give shards of that kind, or {fix}")
        if key == "data.train_shards" and cfg.objective.task == "qa" and not adapter:
            try:
                answers = shard_format.read_answers(spec)
            except FileNotFoundError:
                continue  # said where the answer list is built, if it needs them
            if not answers:
                raise ValueError(f"{where}={spec}: its {shard_format.ANSWERS} lists no answers: these shards are a "
                                 "split without annotations (VQAv2 test-dev or test), which QA cannot train on: train "
                                 "on the train split's shards and evaluate these with aurora-eval")


def check_inputs(cfg, spec, size: int, names: dict, adapter=None, evaluation: bool = False) -> list[str]:
    """Everything a run reads, on this rank, in the order a user would fix it; ``names``: the
    shard keys to check, each with the name its errors give it (a key, or aurora-eval's flag).
    An evaluation holds the checkpoint, tokenizer and preprocessing to ``adapter``'s record."""
    from .data import read_answer_list, tokenizer_source
    from .inputs import check_shards

    said = []
    if cfg.backbone.checkpoint:
        if adapter and not os.path.isdir(cfg.backbone.checkpoint):
            raise FileNotFoundError(f"backbone.checkpoint={cfg.backbone.checkpoint}: the checkpoint adapter {adapter} "
                                    "was trained from is not there (moved or deleted?): --set backbone.checkpoint=DIR")
        check_checkpoint_dir(cfg, spec)
    check_tokenizer_given(cfg)
    if evaluation:
        source = tokenizer_source(cfg)
        if source is None:
            raise FileNotFoundError("no tokenizer for " + (f"adapter {adapter}" if adapter else "the frozen checkpoint")
                                    + ": backbone.checkpoint has none and backbone.tokenizer is empty: --set "
                                    "backbone.tokenizer=DIR")
        record = read_record(adapter) if adapter else None
        if record is not None:
            check_evaluation(record, cfg, adapter, source, said.append)
    if cfg.data.source == "shards":
        said += resolve_shard_dirs(cfg, names)
        for key, name in names.items():
            value = getattr(cfg.data, key.split(".")[1])
            if value:
                check_shards(name, value)
        check_shard_kinds(cfg, names, adapter)
    if cfg.eval.answer_list:
        read_answer_list(cfg.eval.answer_list, "eval.answer_list")
    if cfg.engine.deepspeed:
        try:
            build_ds_config(cfg.engine.ds_config, cfg, size)
        except (ValueError, OSError) as exn:
            raise type(exn)(f"engine.ds_config: {exn}") from None  # its message names the file
    return said


def on_every_rank(check, *args):
    """``check(*args)`` on every rank; all stop if any failed. Returns its result."""
    result = problem = None
    try:
        result = check(*args)
    except (ValueError, OSError) as exn:
        problem = exn
    stop_if_any_rank_failed(problem, "checking the run's inputs")
    return result


def resume_point(cfg):
    """The checkpoint a training run resumes from (verified on every rank), held to the run."""
    checkpoint = find_checkpoint(RunDir(cfg.output.dir), cfg.output.resume) if cfg.output.resume else None
    if checkpoint is None:
        return None
    verify_checkpoint(checkpoint)  # every file recorded, present and intact, on every rank
    resumed = read_record(checkpoint / CHECKPOINT_ADAPTER)
    if resumed is not None:  # the same backbone, task, media and checkpoint, or an error naming both
        check_fits(resumed, cfg, checkpoint / CHECKPOINT_ADAPTER, f"resuming it (output.resume={cfg.output.resume})")
        check_checkpoint(resumed, cfg, checkpoint / CHECKPOINT_ADAPTER, say)
    return checkpoint


def digest_weights_once(cfg):
    """The checkpoint's weight digest (its GBs read) made by one rank per node into the cache
    beside the weights, which the node's other ranks then read, rather than every rank reading the
    weights at once. A failure here is left to the checks that follow, on every rank."""
    if not (cfg.backbone.checkpoint and os.path.isdir(cfg.backbone.checkpoint)):
        return
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        try:
            checkpoint_identity(cfg.backbone.checkpoint)
        except (OSError, ValueError):
            pass
    barrier()


def prepare(cfg, adapter=None, evaluation: bool = False) -> RunSetup:
    """Resolve and check the run of ``cfg`` (an evaluation of ``adapter``, or of the frozen
    checkpoint, when ``evaluation``); nothing is built. Starts the process group."""
    from .data import media_size, preprocessing, resolve_tokenizer, text_conventions, tokenizer_source

    record = read_record(adapter) if adapter else None
    if record is not None:
        check_fits(record, cfg, adapter, "this evaluation (its --recipe and --set)")
    spec = check_backbone(cfg)
    if evaluation and cfg.objective.task == "qa" and cfg.eval.inference == "candidates" and not cfg.eval.answer_list:
        # ranking the answers the model was trained with, never ones counted from the evaluation shards
        raise ValueError("candidate inference needs the answer list the model was trained with: set "
                         "eval.answer_list=FILE.json (aurora-eval never counts answers from the evaluation shards)")
    rank, size = setup_distributed(cfg)
    digest_weights_once(cfg)
    names = {"data.eval_shards": "--shards"} if evaluation else {key: key for key in SHARD_FLAGS}
    notes = on_every_rank(check_inputs, cfg, spec, size, names, adapter, evaluation)
    source = tokenizer_source(cfg)
    if evaluation and not cfg.backbone.checkpoint:
        say("[aurora] warning: no backbone checkpoint: evaluating on a random-init backbone, which only matches the "
            "training run's if built the same way (same seed, same ZeRO stage)")
    checkpoint = None if evaluation else resume_point(cfg)
    torch.manual_seed(cfg.engine.seed)  # identical on every rank: identical Aurora init
    ds_config, layout, layout_note = deepspeed_config(cfg, size)
    config = backbone_config(cfg.backbone.name, cfg.backbone.checkpoint or None)
    image_size = media_size(cfg, spec, config, say)
    setup = RunSetup(spec, config, rank, size, ds_config, layout, image_size, checkpoint=checkpoint,
                     notes=[*notes, layout_note] if layout_note else notes)
    if cfg.data.source == "shards":
        from ..backbones import text_vocab_size
        from ..backbones.tokenizer import load_tokenizer

        if evaluation:
            setup.tokenizer = load_tokenizer(source[1], source[0])
            setup.trained = (record["tokenizer"]["trained"] if record and record.get("tokenizer")
                             else trained_here(cfg, Path(source[1])))
        else:
            setup.tokenizer = resolve_tokenizer(cfg, text_vocab_size(spec, config), say)
            setup.trained = source is None
        setup.tokenizer_used = source or ("trained on data.train_shards", str(RunDir(cfg.output.dir).tokenizer))
        setup.special = text_conventions(cfg, spec, config, setup.tokenizer, setup.trained)
    if not evaluation:
        setup.record = AdapterRecord(cfg, image_size, preprocessing(cfg), setup.tokenizer_used, trained=setup.trained)
    return setup


def trained_here(cfg, tokenizer_dir: Path) -> bool:
    """For a tokenizer given without an adapter record (``--zero-shot``): one some run trained on
    its captions (``train_tokenizer`` writes tokenizer.json alone) has [DEC]/[ENC] ids of its own,
    not held to the checkpoint's config; the checkpoint's own tokenizer, or any WordPiece
    vocab.txt, is."""
    same = cfg.backbone.checkpoint and tokenizer_dir.resolve() == Path(cfg.backbone.checkpoint).resolve()
    return not same and not (tokenizer_dir / "vocab.txt").is_file()
