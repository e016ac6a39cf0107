"""The training run, top to bottom: set up, build, inject, wrap, train, checkpoint, evaluate."""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from ..aurora import inject_aurora
from ..backbones import backbone_config, build_backbone, get_spec, text_vocab_size
from ..dist import (barrier, free_port, gather_objects, mean_over_ranks, process_rank, set_compute_device,
                    shutdown, stop_if_any_rank_failed, use_current_collectives, world)
from .backend import CAPTURED, DeepSpeedBackend, PlainBackend, local_parameter_bytes, secondary_parameter_bytes
from .adapter_record import AdapterRecord, check_checkpoint, check_evaluation, check_fits, read_record
from .checkpoint import (find_checkpoint, load_adapter_values, load_checkpoint, save_adapter, save_checkpoint,
                         verify_checkpoint)
from ..backbones import PRECISIONS
from .dsconfig import build_ds_config, gpus_per_node, zero_stage
from .ema import EMA
from .inputs import validate_eval_shards, validate_inputs
from .logging import RunLogger, peak_memory_mb
from .report import quality_lines
from .rundir import CHECKPOINT_ADAPTER, RunDir

def _stderr(message: str):
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


def build_model(cfg, ds_config):
    """The backbone, partitioned as it is built under ZeRO-3, with Aurora injected after."""
    spec = get_spec(cfg.backbone.name)
    keep_alive = None
    if ds_config is not None and zero_stage(ds_config) == 3:
        if spec.family not in ("hf", "blip2"):
            raise ValueError(f"ZeRO-3 training needs a transformers backbone; {cfg.backbone.name} is {spec.family}")
        from transformers.integrations import HfDeepSpeedConfig

        # transformers builds/loads under zero.Init while this object lives.
        keep_alive = HfDeepSpeedConfig(ds_config)
    model = build_backbone(cfg.backbone.name, cfg.backbone.checkpoint or None, PRECISIONS[cfg.engine.precision])
    # Re-seed: the Aurora init must not depend on how much randomness building the backbone
    # consumed (partitioned and whole builds consume differently).
    torch.manual_seed(cfg.engine.seed)
    handle = inject_aurora(model, cfg.adapter_config())
    if cfg.backbone.train_heads and spec.trained_heads:
        handle.train_modules(list(spec.trained_heads))
    if cfg.engine.activation_checkpointing:
        # Only non-reentrant checkpointing works with factors shared across modules: reentrant checkpointing
        # trips ZeRO-3 (duplicate parameter ids in a gradient bucket).
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.disable_input_require_grads()
    return spec, model, handle, keep_alive


def check_backbone(cfg):
    """Before anything is built: the backbone must serve the task."""
    spec = get_spec(cfg.backbone.name)
    if spec.task not in ("retrieval", "vqa"):
        raise ValueError(f"backbone {cfg.backbone.name} is a {spec.task} model: aurora-train needs a retrieval or VQA "
                         "backbone (use the Python API to adapt it inside your own model)")
    if (spec.task == "vqa") != (cfg.objective.task == "qa"):
        raise ValueError(f"objective.task={cfg.objective.task} does not fit backbone {cfg.backbone.name}, a {spec.task} model")
    if cfg.engine.compile == "on" and (spec.interface, cfg.objective.task) not in CAPTURED:
        raise ValueError(f"engine.compile=on captures the step of {sorted(CAPTURED)} (model interface, task) only; "
                         f"{cfg.backbone.name} is ({spec.interface!r}, {cfg.objective.task!r}): set engine.compile=off or auto")


def make_objective(cfg, model):
    """The task's loss as an nn.Module around the backbone (what DeepSpeed wraps), from the
    table of (model interface, task) pairs."""
    from ..tasks.objectives import make_objective as from_table

    return from_table(get_spec(cfg.backbone.name).interface, cfg.objective.task, model, cfg)


def loader_state(data) -> dict:
    """This rank's loader position (each rank saves its own: the positions differ per rank)."""
    return data.state_dict() if hasattr(data, "state_dict") else {}


def steps_per_epoch(data, grad_accum: int) -> int | None:
    """Optimizer steps per epoch, the same on every rank (the smallest rank's epoch sets it), or
    None when the length is unknown. A rank without a batch is an error naming it (collective)."""
    try:
        n = len(data)
    except TypeError:
        n = None
    describe = getattr(data, "describe", None)
    reports = gather_objects((n, describe() if describe and n == 0 else ""))
    lengths = [length for length, _ in reports]
    if any(length is None for length in lengths):
        return None
    empty = [(r, text) for r, (length, text) in enumerate(reports) if length == 0]
    if empty:
        raise ValueError("no training batch per epoch on rank(s) %s: %s. Remedy: more shards than ranks x "
                         "data.num_workers (or fewer ranks), and a manifest that lists the shards' samples"
                         % ([r for r, _ in empty], "; ".join(text or f"rank {r}" for r, text in empty)))
    if min(lengths) < grad_accum:
        raise ValueError(f"an epoch has {min(lengths)} batch(es) on the smallest rank, fewer than "
                         f"optim.grad_accum={grad_accum}: lower optim.grad_accum or optim.batch_size, or add data")
    return min(lengths) // grad_accum


def length_unknown(data) -> str:
    """Why ``len(data)`` is unknown, in the loader's words."""
    try:
        len(data)
    except TypeError as exn:
        return str(exn)
    return "an empty epoch"


def trace_batch(step: int, epoch: int, batch: dict) -> None:
    """``AURORA_TRACE_SAMPLES=DIR``: each rank appends what every micro-batch held (diagnostics,
    and how the tests check that a resumed run sees exactly the samples of an uninterrupted one)."""
    folder = os.environ.get("AURORA_TRACE_SAMPLES")
    if not folder:
        return
    record = {"step": step, "epoch": epoch, "media_id": list(batch.get("media_id", [])),
              "caption": list(batch.get("caption", batch.get("question", [])))}
    with open(Path(folder) / f"rank_{process_rank():05d}.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def batches(source, start_epoch: int):
    """Endless (epoch, batch) pairs; each epoch re-seeds the loader's shuffling."""
    epoch = start_epoch
    while True:
        if hasattr(source, "set_epoch"):
            source.set_epoch(epoch)
        empty = True
        for batch in source:
            empty = False
            yield epoch, batch
        if empty and start_epoch != epoch:  # (a resumed epoch may have nothing left)
            raise RuntimeError(f"the training data gave no batch in epoch {epoch}: stopping instead of "
                               "cycling through empty epochs")
        epoch += 1


def train(cfg, data=None, evaluator=None) -> dict:
    """Run one training job; returns a summary (also written to the run's summary.json).

    ``data`` is an iterable of batches (the streaming loader, or synthetic batches);
    ``evaluator(model, handle, step)`` returns metrics (higher ``select`` is better).
    """
    check_backbone(cfg)
    rank, size = setup_distributed(cfg)
    validate_inputs(cfg, size)  # shards, checkpoint, tokenizer, DeepSpeed config, answer list: before any build
    torch.manual_seed(cfg.engine.seed)  # identical on every rank: identical Aurora init
    ds_config, layout, layout_note = deepspeed_config(cfg, size)
    run = RunDir(cfg.output.dir)
    checkpoint = find_checkpoint(run, cfg.output.resume) if cfg.output.resume else None
    if checkpoint is not None:  # every file recorded, present and intact, on every rank
        verify_checkpoint(checkpoint)
    resumed = read_record(checkpoint / CHECKPOINT_ADAPTER) if checkpoint is not None else None
    if resumed is not None:  # the same backbone, task, media and checkpoint, or an error naming both
        check_fits(resumed, cfg, checkpoint / CHECKPOINT_ADAPTER, f"resuming it (output.resume={cfg.output.resume})")
        check_checkpoint(resumed, cfg, checkpoint / CHECKPOINT_ADAPTER)
    # Everything that can be checked is checked before the backbone is built: the inputs above,
    # the checkpoint's config, the tokenizer against it, the data.
    spec = get_spec(cfg.backbone.name)
    config = backbone_config(cfg.backbone.name, cfg.backbone.checkpoint or None)
    from .data import media_size

    image_size = media_size(cfg, spec, config, _stderr if rank == 0 else None)
    vocab = text_vocab_size(spec, config)
    tokenizer = special = given = None
    if cfg.data.source == "shards":
        from .data import (answer_list, build_evaluator, build_train_data, resolve_tokenizer, text_conventions,
                           tokenizer_source)

        tokenizer = resolve_tokenizer(cfg, vocab, _stderr if rank == 0 else None)
        given = tokenizer_source(cfg)
        special = text_conventions(cfg, spec, config, tokenizer, trained_here=given is None)
        data = data if data is not None else build_train_data(cfg, image_size, tokenizer)
        if cfg.objective.task == "qa" and cfg.eval.inference == "candidates":
            answer_list(cfg, run)  # in the run before any adapter is saved: each carries it, evaluation shards or not
        if evaluator is None and cfg.data.eval_shards:
            evaluator = build_evaluator(cfg, image_size, tokenizer, run)
    elif data is None:
        from .synthetic import SyntheticBatches

        data = SyntheticBatches(cfg, image_size, vocab, rank, size)
    tester = None
    if cfg.data.source == "shards" and cfg.data.test_shards:
        tester = build_evaluator(cfg, image_size, tokenizer, run, split="test")
    from .data import preprocessing

    used = None if tokenizer is None else given or ("trained on data.train_shards", str(run.tokenizer))
    record = AdapterRecord(cfg, image_size, preprocessing(cfg), used, trained=tokenizer is not None and given is None)
    per_epoch = steps_per_epoch(data, cfg.optim.grad_accum)
    total_steps = cfg.optim.max_steps or (per_epoch * cfg.optim.epochs if per_epoch else 0)
    if total_steps <= 0:
        raise ValueError(f"the training data has no known length per epoch ({length_unknown(data)}): set "
                         "optim.max_steps (each rank then reads its shards epoch after epoch until that many "
                         "steps) or data.train_num_samples (training pairs per epoch)")
    if hasattr(data, "last_epoch") and per_epoch:
        data.last_epoch = (total_steps - 1) // per_epoch  # workers for an epoch the run never reads would idle
    if checkpoint is None and hasattr(data, "prefetch"):
        data.prefetch()  # the loader's workers start while the model is built (a resume positions it first)
    spec, model, handle, _zero3_context = build_model(cfg, ds_config)  # held for the whole run
    objective = make_objective(cfg, model)
    objective.tokenizer = tokenizer
    if special is not None:
        objective.special = special
    if cfg.engine.deepspeed:
        backend = DeepSpeedBackend(objective, cfg, total_steps, ds_config)
    else:
        backend = PlainBackend(objective, cfg, total_steps)
    objective.train()  # from_pretrained returns eval mode; DeepSpeed does not change it
    objective.ema = EMA(backend, handle.named_trainable_parameters(), cfg.objective.momentum)

    log = RunLogger(run.tensorboard, rank == 0, total_steps, 0, cfg.output.progress, cfg.output.log_every)
    log.message(f"[aurora] {handle.format_parameter_report()}")
    if layout_note:
        log.message(layout_note)
    if cfg.data.test_shards and cfg.data.test_shards == cfg.data.eval_shards:
        log.message("[aurora] warning: data.eval_shards and data.test_shards are the same shards: adapter_best is "
                    "chosen on the test set, so its test metrics are not held out")
    log.message(f"[aurora] {size} rank(s), backbone parameters on this rank: {local_parameter_bytes(objective) / 2**20:.1f} MiB")
    step, epoch = 0, 0
    skipped: dict[str, int] = {}
    history: list[dict] = []
    evaluations: list[dict] = []
    best = frozen = None
    if checkpoint is not None:
        step, client, data_state = load_checkpoint(checkpoint, backend, handle, log.message)
        objective.ema.load_state_dict(client["ema"])
        objective.load_objective_state(client["objective"])
        epoch = int(client["epoch"])
        # The summary covers the whole run, not only the steps after the resume.
        history, skipped = list(client.get("history", [])), dict(client.get("skipped", {}))
        best, frozen, evaluations = client.get("best"), client.get("frozen"), list(client.get("evaluations", []))
        if data_state is not None:
            data.load_state_dict(data_state)
        log.message(f"[aurora] resumed from {checkpoint} at step {step}")
    elif cfg.output.resume == "auto":
        log.message(f"[aurora] no complete checkpoint in {run.checkpoints}: starting fresh")
    if checkpoint is None and cfg.eval.at_start and (evaluator or tester):
        frozen = evaluate_at_start(evaluator, tester, backend, handle, objective, log)
        evaluations += [{"step": 0, **frozen["val"]}] if "val" in frozen else []

    stream = batches(data, epoch)
    while step < total_steps:
        t0 = time.perf_counter()
        waited, samples, terms = 0.0, 0, {}
        for _ in range(cfg.optim.grad_accum):
            t_data = time.perf_counter()
            try:
                epoch, batch = next(stream)
                problem = None
            except Exception as exn:  # noqa: BLE001 - every rank must learn of it, then all stop
                problem = exn
            waited += time.perf_counter() - t_data  # this rank's wait (the check below syncs ranks)
            stop_if_any_rank_failed(problem, "reading the training data")
            trace_batch(step + 1, epoch, batch)
            for reason, n in batch.get("skipped", {}).items():
                skipped[reason] = skipped.get(reason, 0) + n
            backend.begin_step()
            losses = objective.losses(backend.forward, batch, step)
            backend.backward(losses["loss"])
            backend.step()
            samples += len(batch["input_ids"]) * size
            for k, v in losses.items():
                terms[k] = terms.get(k, 0.0) + mean_over_ranks(v) / cfg.optim.grad_accum
        step += 1
        elapsed = time.perf_counter() - t0
        history.append({"step": step, **terms, "time_s": elapsed, "data_wait_s": waited, "samples": samples})
        if step % cfg.output.log_every == 0 or step == total_steps:
            log.scalars(step, {**terms, "lr": backend.lr(), "samples_per_s": samples / elapsed,
                               "data_wait_s": waited, "data_wait_fraction": waited / elapsed,
                               "peak_memory_mb": peak_memory_mb(), "epoch": epoch})
            log.scalars(step, skipped, prefix="skipped")
        log.advance(step, terms)

        last = step == total_steps
        if evaluator is not None and ((cfg.eval.every and step % cfg.eval.every == 0) or last):
            objective.eval()  # no dropout while evaluating
            metrics = evaluator(backend.forward, handle, step)
            objective.train()
            log.scalars(step, metrics, prefix="eval")
            log.message(f"[aurora] step {step} eval: {json.dumps(metrics)}")
            evaluations.append({"step": step, **metrics})
            # an evaluation set without labels (VQAv2 test-dev) has nothing to select on
            if metrics.get("select") is not None and (best is None or metrics["select"] > best["select"]):
                best = {"step": step, **metrics}
                save_adapter(backend, handle, run.adapter_best, {"step": step, "metrics": metrics}, record)
        if (cfg.output.save_every and step % cfg.output.save_every == 0) or last:
            client = {"ema": objective.ema.state_dict(), "objective": objective.objective_state(),
                      "epoch": epoch, "step": step, "history": history, "skipped": skipped,
                      "best": best, "frozen": frozen, "evaluations": evaluations}
            data_state = loader_state(data)
            save_checkpoint(run, step, backend, handle, client, data_state, cfg, cfg.output.keep_checkpoints, record)
            save_adapter(backend, handle, run.adapter_latest, {"step": step}, record)

    test = None
    if tester is not None:
        test = report_on_test(tester, backend, handle, objective, run, best, step, log)
    peaks = gather_objects(peak_memory_mb())
    summary = {"steps": step, "world_size": size, "ds_config": layout, "parameters": handle.parameter_report(), "skipped": skipped,
               "frozen": frozen, "evaluations": evaluations, "best": best, "test": test, **data_wait(history),
               **throughput(history, size), "history": history, "peak_memory_mb": peaks[0], "peak_memory_mb_per_rank": peaks,
               "local_parameter_bytes": local_parameter_bytes(objective),
               "secondary_parameter_bytes": secondary_parameter_bytes(objective), "run": record.record}
    if rank == 0:
        run.root.mkdir(parents=True, exist_ok=True)
        run.summary.write_text(json.dumps(summary, indent=2))
        for line in quality_lines(summary):
            log.message(f"[aurora] {line}")
        log.message(f"[aurora] done: adapter in {run.adapter_latest}, TensorBoard logs in {run.tensorboard}"
                    + (f", skipped samples {skipped}" if skipped else ""))
    log.close()
    shutdown()
    return summary



def data_wait(history: list[dict]) -> dict:
    """How much of the training time went to waiting for batches: overall (the sum of the waits
    over the sum of the step times) and the median of the per-step fractions after the first step
    (which also pays the workers' start-up and the first forward's one-time costs)."""
    total = sum(h["time_s"] for h in history)
    steady = [h["data_wait_s"] / h["time_s"] for h in history[1:] if h["time_s"] > 0] or [
        h["data_wait_s"] / h["time_s"] for h in history if h["time_s"] > 0]
    return {"data_wait_fraction": sum(h["data_wait_s"] for h in history) / total if total else None,
            "data_wait_fraction_median": statistics.median(steady) if steady else None}


def throughput(history: list[dict], size: int) -> dict:
    """Training samples per second over the run's steps (all ranks together, and per rank)."""
    total = sum(h["time_s"] for h in history)
    rate = sum(h.get("samples", 0) for h in history) / total if total else None
    return {"samples_per_s": rate, "samples_per_s_per_rank": rate / size if rate is not None else None}


def evaluate_at_start(evaluator, tester, backend, handle, objective, log) -> dict:
    """The frozen model's metrics on each evaluation set, before the first step: Aurora starts as
    the identity (V = 0, gates at 0), so the model at step 0 is the backbone itself, at no extra
    build. Step 0 is the baseline every later evaluation is read against, never adapter_best."""
    objective.eval()
    frozen = {}
    for split, prefix, run_eval in (("val", "eval", evaluator), ("test", "test", tester)):
        if run_eval is not None:
            about = ({"adapter": "frozen", "step": 0},) if split == "test" else ()
            frozen[split] = run_eval(backend.forward, handle, 0, *about)
            log.scalars(0, frozen[split], prefix=prefix)
            log.message(f"[aurora] step 0 (frozen) {prefix}: {json.dumps(frozen[split])}")
    objective.train()
    return frozen


def report_on_test(tester, backend, handle, objective, run: RunDir, best: dict | None, step: int, log) -> dict:
    """Select on validation, report on test: the adapter chosen on ``data.eval_shards``
    (adapter_best), else (no validation) the last one, evaluated on ``data.test_shards``; the
    metrics name the adapter and its step (eval/test_step_N.json, TensorBoard ``test/``)."""
    chosen, at = (run.adapter_best, best["step"]) if best is not None else (run.adapter_latest, step)
    if at != step:  # the model holds the last step's values
        load_adapter_values(backend, handle, chosen)
    about = {"adapter": chosen.name, "step": at}
    objective.eval()
    metrics = tester(backend.forward, handle, at, about)
    log.scalars(at, metrics, prefix="test")
    log.message(f"[aurora] test ({chosen.name}, step {at}): {json.dumps(metrics)}")
    return {**about, "metrics": metrics}


def _trained_here(cfg, tokenizer_dir: Path) -> bool:
    """For a tokenizer given without an adapter record (``--zero-shot``): one some run trained on
    its captions (``train_tokenizer`` writes tokenizer.json alone) has [DEC]/[ENC] ids of its own,
    not held to the checkpoint's config; the checkpoint's own tokenizer, or any WordPiece
    vocab.txt, is."""
    same = cfg.backbone.checkpoint and tokenizer_dir.resolve() == Path(cfg.backbone.checkpoint).resolve()
    return not same and not (tokenizer_dir / "vocab.txt").is_file()


def evaluate(cfg, adapter_dir=None) -> dict:
    """Evaluate a saved adapter on cfg.data.eval_shards (``aurora-eval``); any number of ranks.
    Without an adapter, the frozen checkpoint: Aurora is injected with V = 0, an exact no-op.
    An adapter's record (``adapter_record.py``) is checked against ``cfg`` before anything is built."""
    from ..aurora.io import read_adapter_config
    from .checkpoint import load_adapter_values
    from .data import build_evaluator, media_size, text_conventions, tokenizer_source
    from ..backbones.tokenizer import load_tokenizer

    record = read_record(adapter_dir) if adapter_dir else None
    if record is not None:
        check_fits(record, cfg, adapter_dir, "this evaluation (its --recipe and --set)")
    check_backbone(cfg)
    source = tokenizer_source(cfg)
    if source is None:
        raise FileNotFoundError("no tokenizer for " + (f"adapter {adapter_dir}" if adapter_dir else "the frozen checkpoint")
                                + ": backbone.checkpoint has none and backbone.tokenizer is empty: --set backbone.tokenizer=DIR")
    if record is not None:
        check_evaluation(record, cfg, adapter_dir, source)
    # Candidate inference ranks the answers the adapter's run ranked (it carries them), or a
    # configured list; never answers counted from the evaluation shards (that would leak the labels).
    if cfg.objective.task == "qa" and cfg.eval.inference == "candidates" and not cfg.eval.answer_list:
        raise ValueError("candidate inference needs the answer list the model was trained with: set "
                         "eval.answer_list=FILE.json (aurora-eval never counts answers from the evaluation shards)")
    rank, size = setup_distributed(cfg)
    validate_eval_shards(cfg.data.eval_shards)
    if not cfg.backbone.checkpoint and rank == 0:
        print("[aurora] warning: no backbone checkpoint: evaluating on a random-init backbone, which only "
              "matches the training run's if built the same way (same seed, same ZeRO stage)", file=sys.stderr)
    torch.manual_seed(cfg.engine.seed)
    ds_config, _, _ = deepspeed_config(cfg, size)
    spec = get_spec(cfg.backbone.name)
    config = backbone_config(cfg.backbone.name, cfg.backbone.checkpoint or None)
    tokenizer = load_tokenizer(source[1], source[0])
    trained = record["tokenizer"]["trained"] if record and record.get("tokenizer") else _trained_here(cfg, Path(source[1]))
    special = text_conventions(cfg, spec, config, tokenizer, trained)
    spec, model, handle, _zero3_context = build_model(cfg, ds_config)
    objective = make_objective(cfg, model)
    objective.tokenizer = tokenizer
    if special is not None:
        objective.special = special
    backend = DeepSpeedBackend(objective, cfg, 1, ds_config) if cfg.engine.deepspeed else PlainBackend(objective, cfg, 1)
    if adapter_dir:
        load_adapter_values(backend, handle, adapter_dir)
    objective.eval()
    evaluator = build_evaluator(cfg, media_size(cfg, spec, config, _stderr if rank == 0 else None), tokenizer, RunDir(cfg.output.dir))
    step = read_adapter_config(adapter_dir)["extra"].get("step", 0) if adapter_dir else 0
    metrics = evaluator(backend.forward, handle, step)
    if rank == 0:
        print(json.dumps(metrics, indent=2))
    shutdown()
    return metrics
