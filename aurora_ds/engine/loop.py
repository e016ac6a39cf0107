"""The training run, top to bottom: set up, build, inject, wrap, train, checkpoint, evaluate."""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from ..aurora import inject_aurora
from ..backbones import PRECISIONS, build_backbone
from ..dist import gather_objects, mean_over_ranks, process_rank, shutdown, stop_if_any_rank_failed
from .backend import DeepSpeedBackend, PlainBackend, local_parameter_bytes, secondary_parameter_bytes
from .checkpoint import load_adapter_values, load_checkpoint, save_adapter, save_checkpoint
from .dsconfig import zero_stage
from .ema import EMA
from .logging import HostMemory, RunLogger, peak_memory_mb
from .report import quality_lines
from .rundir import RunDir
from .setup import RunSetup, prepare


def build_model(cfg, setup: RunSetup):
    """The backbone, partitioned as it is built under ZeRO-3, with Aurora injected after, and
    the task's objective around it (complete: the run's tokenizer and special tokens)."""
    spec, ds_config, keep_alive = setup.spec, setup.ds_config, None
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
    return make_objective(cfg, model, setup.tokenizer, setup.special), handle, keep_alive


def make_backend(cfg, objective, total_steps: int, setup: RunSetup):
    """DeepSpeed's engine around the objective, or the single-process reference path."""
    if cfg.engine.deepspeed:
        return DeepSpeedBackend(objective, cfg, total_steps, setup.ds_config)
    return PlainBackend(objective, cfg, total_steps)


def make_objective(cfg, model, tokenizer=None, special=None):
    """The task's loss as an nn.Module around the backbone (what DeepSpeed wraps), from the
    table of (model interface, task) pairs."""
    from ..backbones import get_spec
    from ..tasks.objectives import make_objective as from_table

    return from_table(get_spec(cfg.backbone.name).interface, cfg.objective.task, model, cfg, tokenizer, special)


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
    setup = prepare(cfg)  # everything resolved and checked before the backbone is built
    rank, size, run = setup.rank, setup.size, RunDir(cfg.output.dir)
    data, evaluator, tester = inputs(cfg, setup, run, data, evaluator)
    total_steps = plan_steps(cfg, data)
    if setup.checkpoint is None and hasattr(data, "prefetch"):
        data.prefetch()  # the loader's workers start while the model is built (a resume positions it first)
    memory, began = HostMemory("loading"), time.perf_counter()
    objective, handle, _zero3_context = build_model(cfg, setup)  # the context is held for the whole run
    backend = make_backend(cfg, objective, total_steps, setup)
    memory.phase("training")
    done_loading = time.perf_counter() - began
    evaluator, tester = memory.watching("evaluation", evaluator), memory.watching("evaluation", tester)
    objective.train()  # from_pretrained returns eval mode; DeepSpeed does not change it
    objective.ema = EMA(backend, handle.named_trainable_parameters(), cfg.objective.momentum)
    log = RunLogger(run.tensorboard, rank == 0, total_steps, 0, cfg.output.progress, cfg.output.log_every)
    for note in [f"[aurora] {handle.format_parameter_report()}", *setup.notes, *warnings_for(cfg),
                 loading_note(objective, done_loading)]:
        log.message(note)
    log.message(f"[aurora] {size} rank(s), backbone parameters on this rank: {local_parameter_bytes(objective) / 2**20:.1f} MiB")
    done = resume(cfg, setup.checkpoint, backend, handle, objective, data, run, log)
    if setup.checkpoint is None and cfg.eval.at_start and (evaluator or tester):
        done.frozen = evaluate_at_start(evaluator, tester, backend, handle, objective, log)
        done.evaluations += [{"step": 0, **done.frozen["val"]}] if "val" in done.frozen else []
    step, epoch, history, skipped = done.step, done.epoch, done.history, done.skipped

    stream = batches(data, epoch)
    while step < total_steps:
        t0 = time.perf_counter()
        waited, samples, terms = 0.0, 0, {}
        for _ in range(cfg.optim.grad_accum):
            epoch, batch, wait = next_batch(stream)
            waited += wait
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

        done.step, done.epoch = step, epoch
        last = step == total_steps
        if evaluator is not None and ((cfg.eval.every and step % cfg.eval.every == 0) or last):
            objective.eval()  # no dropout while evaluating
            metrics = evaluator(backend.forward, handle, step)
            objective.train()
            log.scalars(step, metrics, prefix="eval")
            log.message(f"[aurora] step {step} eval: {json.dumps(metrics)}")
            if done.evaluated(metrics):
                save_adapter(backend, handle, run.adapter_best, {"step": step, "metrics": metrics}, setup.record)
        if (cfg.output.save_every and step % cfg.output.save_every == 0) or last:
            client = {"ema": objective.ema.state_dict(), "objective": objective.objective_state(),
                      **dataclasses.asdict(done)}
            save_checkpoint(run, step, backend, handle, client, loader_state(data), cfg, cfg.output.keep_checkpoints,
                            setup.record)
            save_adapter(backend, handle, run.adapter_latest, {"step": step}, setup.record)

    test = report_on_test(tester, backend, handle, objective, run, done.best, step, log) if tester else None
    summary = summarize(setup, done, handle, objective, test, {"loading_s": done_loading, "host_memory": memory.stop()})
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


def next_batch(stream) -> tuple:
    """(epoch, batch, seconds this rank waited for it); a failure on any rank stops every rank."""
    t0 = time.perf_counter()
    epoch = batch = problem = None
    try:
        epoch, batch = next(stream)
    except Exception as exn:  # noqa: BLE001 - every rank must learn of it, then all stop
        problem = exn
    waited = time.perf_counter() - t0  # this rank's wait (the check below syncs ranks)
    stop_if_any_rank_failed(problem, "reading the training data")
    return epoch, batch, waited


def loading_note(objective, seconds: float) -> str:
    """How long building and loading the backbone took, and how much of the checkpoint this rank
    read (rank 0's; under ZeRO-3 each rank reads its own share)."""
    report = getattr(objective.backbone, "load_report", None)
    read = f", this rank read {report.read_bytes / 2**30:.2f} GiB of {report.files} file(s)" if report else ""
    return f"[aurora] backbone built and wrapped in {seconds:.1f} s{read}"


def summarize(setup: RunSetup, done: "Progress", handle, objective, test: dict | None, loading: dict) -> dict:
    """The run's summary.json: how good (frozen, every validation, best, test), how fast and how
    big (throughput, data wait, peak memory per rank, loading time and each rank's peak host
    memory while loading and while training, parameters), and the run's record."""
    peaks, host = gather_objects(peak_memory_mb()), gather_objects(loading["host_memory"])
    return {"steps": done.step, "world_size": setup.size, "ds_config": setup.layout,
            "parameters": handle.parameter_report(), "skipped": done.skipped, "frozen": done.frozen,
            "evaluations": done.evaluations, "best": done.best, "test": test, **data_wait(done.history),
            **throughput(done.history, setup.size), "history": done.history, "peak_memory_mb": peaks[0],
            "peak_memory_mb_per_rank": peaks, "loading_s": round(loading["loading_s"], 2),
            "host_memory_mb_per_rank": host, "local_parameter_bytes": local_parameter_bytes(objective),
            "secondary_parameter_bytes": secondary_parameter_bytes(objective), "run": setup.record.record}


def inputs(cfg, setup: RunSetup, run: RunDir, data, evaluator):
    """(training data, validation evaluator or None, test evaluator or None): the streaming
    loaders over the run's shards, or synthetic batches; ``data``/``evaluator`` given win."""
    from .data import answer_list, build_evaluator, build_train_data

    if cfg.data.source != "shards":
        from .synthetic import SyntheticBatches

        return data or SyntheticBatches(cfg, setup.image_size, text_vocab(setup), setup.rank, setup.size), evaluator, None
    data = data if data is not None else build_train_data(cfg, setup.image_size, setup.tokenizer)
    if cfg.objective.task == "qa" and cfg.eval.inference == "candidates":
        answer_list(cfg, run)  # in the run before any adapter is saved: each carries it, evaluation shards or not
    if evaluator is None and cfg.data.eval_shards:
        evaluator = build_evaluator(cfg, setup.image_size, setup.tokenizer, run)
    tester = build_evaluator(cfg, setup.image_size, setup.tokenizer, run, split="test") if cfg.data.test_shards else None
    return data, evaluator, tester


def text_vocab(setup: RunSetup) -> int:
    from ..backbones import text_vocab_size

    return text_vocab_size(setup.spec, setup.config)


def plan_steps(cfg, data) -> int:
    """Optimizer steps of the run: ``optim.max_steps``, else epochs x steps per epoch."""
    per_epoch = steps_per_epoch(data, cfg.optim.grad_accum)
    total_steps = cfg.optim.max_steps or (per_epoch * cfg.optim.epochs if per_epoch else 0)
    if total_steps <= 0:
        raise ValueError(f"the training data has no known length per epoch ({length_unknown(data)}): set "
                         "optim.max_steps (each rank then reads its shards epoch after epoch until that many "
                         "steps) or data.train_num_samples (training pairs per epoch)")
    if hasattr(data, "last_epoch") and per_epoch:
        data.last_epoch = (total_steps - 1) // per_epoch  # workers for an epoch the run never reads would idle
    return total_steps


def warnings_for(cfg) -> list[str]:
    if cfg.data.test_shards and cfg.data.test_shards == cfg.data.eval_shards:
        return ["[aurora] warning: data.eval_shards and data.test_shards are the same shards: adapter_best is "
                "chosen on the test set, so its test metrics are not held out"]
    return []


@dataclasses.dataclass
class Progress:
    """How far the run is and what it has seen: kept in each checkpoint (beside the model, the
    objective and the loader's position), so that the summary covers the whole run, resumed or not."""

    step: int = 0
    epoch: int = 0
    history: list = dataclasses.field(default_factory=list)  # one entry per step: loss terms, times, samples
    skipped: dict = dataclasses.field(default_factory=dict)  # skipped samples per reason
    best: dict | None = None  # the best validation so far (adapter_best), with its step
    frozen: dict | None = None  # the frozen model's metrics at step 0, per split
    evaluations: list = dataclasses.field(default_factory=list)  # every validation, step 0 included

    def evaluated(self, metrics: dict) -> bool:
        """Record a validation at this step; True where it is the best so far (an evaluation set
        without labels, VQAv2 test-dev, has nothing to select on)."""
        self.evaluations.append({"step": self.step, **metrics})
        if metrics.get("select") is None or (self.best is not None and metrics["select"] <= self.best["select"]):
            return False
        self.best = {"step": self.step, **metrics}
        return True


def resume(cfg, checkpoint, backend, handle, objective, data, run: RunDir, log) -> Progress:
    """The :class:`Progress` restored from ``checkpoint`` (with the model, objective and loader),
    or a fresh start's."""
    if checkpoint is None:
        if cfg.output.resume == "auto":
            log.message(f"[aurora] no complete checkpoint in {run.checkpoints}: starting fresh")
        return Progress()
    step, client, data_state = load_checkpoint(checkpoint, backend, handle, log.message)
    objective.ema.load_state_dict(client["ema"])
    objective.load_objective_state(client["objective"])
    if data_state is not None:
        data.load_state_dict(data_state)
    log.message(f"[aurora] resumed from {checkpoint} at step {step}")
    kept = {f.name: client[f.name] for f in dataclasses.fields(Progress) if f.name in client}
    return Progress(**{**kept, "step": step, "epoch": int(client["epoch"])})


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


def evaluate(cfg, adapter_dir=None) -> dict:
    """Evaluate a saved adapter on cfg.data.eval_shards (``aurora-eval``); any number of ranks.
    Without an adapter, the frozen checkpoint: Aurora is injected with V = 0, an exact no-op.
    An adapter's record (``adapter_record.py``) is checked against ``cfg`` before anything is built."""
    from ..aurora.io import read_adapter_config
    from .data import build_evaluator

    setup = prepare(cfg, adapter_dir, evaluation=True)
    for note in setup.notes:
        if setup.rank == 0:
            print(note, file=sys.stderr, flush=True)
    objective, handle, _zero3_context = build_model(cfg, setup)
    backend = make_backend(cfg, objective, 1, setup)
    if adapter_dir:
        load_adapter_values(backend, handle, adapter_dir)
    objective.eval()
    evaluator = build_evaluator(cfg, setup.image_size, setup.tokenizer, RunDir(cfg.output.dir))
    step = read_adapter_config(adapter_dir)["extra"].get("step", 0) if adapter_dir else 0
    metrics = evaluator(backend.forward, handle, step)
    if setup.rank == 0:
        print(json.dumps(metrics, indent=2))
    shutdown()
    return metrics
