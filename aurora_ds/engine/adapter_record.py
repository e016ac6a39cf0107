"""What an adapter records about the run that trained it, and the checks that hold a later run to
that record, so that ``aurora-eval --adapter DIR --shards SPEC`` needs nothing else: not the run
directory, not the recipe. ``aurora/io.py`` writes the record as plain values (the ``run`` key of
``adapter_config.json``) and carries the files; what they mean is decided here::

    backbone       name, family, interface (blip | blip2) of the registered backbone
    task, media    objective.task (retrieval | qa) and data.media (image | video)
    checkpoint     path, SHA-256 over config.json, weight index, weight names and sizes, SHA-256
                   of the weight bytes, architectures (backbones.checkpoint_identity), or
                   {"random_init": NAME}
    tokenizer      source, SHA-256 of its files, whether it was trained on the run's text (then
                   the adapter carries it in tokenizer/); null for synthetic data
    preprocessing  mean, std, size, resample, as the run fed the images
    config         the resolved nested run configuration (TrainConfig.to_dict())
    answer_list    "answer_list.json" when the adapter carries the answers QA ranked

The adapter's record wins over its run directory, which need not exist; where it does, it must
agree (the adapter may have been copied into another run's directory).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..aurora.io import adapter_path, file_digest, read_adapter_config
from ..backbones import checkpoint_identity, get_spec
from ..backbones.tokenizer import tokenizer_files, tokenizer_identity
from .rundir import RunDir

TOKENIZER_DIR = "tokenizer"
ANSWER_LIST = "answer_list.json"
# The run configuration that decides what an adapter is; a run directory must agree on these.
DEFINING_KEYS = ("backbone.name", "backbone.checkpoint", "objective.task", "data.media")


class AdapterRecord:
    """Built once per run, before the backbone; :meth:`contents` is what every adapter it saves
    records (the answer list as it stands at that save)."""

    def __init__(self, cfg, image_size: int, prep: dict, tokenizer: tuple[str, str] | None, trained: bool):
        """``tokenizer``: (config key, directory) of the run's tokenizer, or (how it was trained,
        directory) when ``trained`` on the run's text (then the adapter carries it); None without
        text (synthetic data)."""
        spec = get_spec(cfg.backbone.name)
        self.run = RunDir(cfg.output.dir)
        self.task = cfg.objective.task
        self.tokenizer_dir = Path(tokenizer[1]) if tokenizer and trained else None
        self.record = {
            "backbone": {"name": spec.name, "family": spec.family, "interface": spec.interface},
            "task": cfg.objective.task,
            "media": cfg.data.media,
            "checkpoint": (checkpoint_identity(cfg.backbone.checkpoint) if cfg.backbone.checkpoint
                           else {"random_init": cfg.backbone.name}),
            "tokenizer": tokenizer and {"source": tokenizer[0] if trained else "=".join(tokenizer),
                                        "sha256": tokenizer_identity(tokenizer[1]), "trained": trained},
            "preprocessing": {"mean": list(prep["mean"]), "std": list(prep["std"]), "size": image_size,
                              "resample": prep["resample"]},
            "config": cfg.to_dict(),
        }

    def contents(self) -> tuple[dict, dict]:
        """(record, files to carry) for ``write_adapter``."""
        record = dict(self.record)
        files = {f"{TOKENIZER_DIR}/{f.name}": f for f in tokenizer_files(self.tokenizer_dir)} if self.tokenizer_dir else {}
        if self.task == "qa" and self.run.answer_list.is_file():
            files[ANSWER_LIST] = self.run.answer_list
            record["answer_list"] = ANSWER_LIST
        return record, files


def read_record(adapter_dir) -> dict | None:
    """The run record of an adapter, None for one without (format 2, or saved by the Python API)."""
    return read_adapter_config(adapter_dir).get("run")


def carried_values(adapter_dir, record: dict) -> dict:
    """Config values that point at what the adapter carries and fix what the run fed: its own
    tokenizer (if trained on the run's text), answer list and image size."""
    values = {"data.image_size": record["preprocessing"]["size"]}
    if (record.get("tokenizer") or {}).get("trained"):
        values["backbone.tokenizer"] = str(adapter_path(adapter_dir, TOKENIZER_DIR))
    if record.get("answer_list"):
        values["eval.answer_list"] = str(adapter_path(adapter_dir, record["answer_list"]))
    return values


def _model(cfg) -> dict:
    return {"backbone": cfg.backbone.name, "interface": get_spec(cfg.backbone.name).interface,
            "task": cfg.objective.task, "media": cfg.data.media}


def check_fits(record: dict, cfg, adapter_dir, asked_by: str):
    """An adapter of one backbone, task or media used for another is an error naming both."""
    recorded = {"backbone": record["backbone"]["name"], "interface": record["backbone"]["interface"],
                "task": record["task"], "media": record["media"]}
    wanted = _model(cfg)
    if recorded != wanted:
        def say(m):
            return f"{m['task']} on {m['media']} with backbone {m['backbone']} ({m['interface'] or 'no'} interface)"

        raise ValueError(f"adapter {adapter_dir} was trained for {say(recorded)}; {asked_by} asks for {say(wanted)}")


def check_checkpoint(record: dict, cfg, adapter_dir, log=None):
    """The backbone checkpoint (recorded path, or ``--set backbone.checkpoint``) must be the one
    the adapter was trained on: another architecture, config or weight layout is an error; the
    same layout with other weight values (BLIP's COCO and Flickr ITM checkpoints), or a copy at
    another path, is a warning naming both, said through ``log`` (a print-like callable). An
    adapter recorded before weights were digested is held to the layout alone."""
    recorded = record["checkpoint"]
    given = cfg.backbone.checkpoint
    if "random_init" in recorded:
        if given:
            raise ValueError(f"adapter {adapter_dir} was trained on a random-init {recorded['random_init']} (no "
                             f"checkpoint), but backbone.checkpoint={given} is given: set backbone.checkpoint= (empty)")
        return
    if not given:
        raise ValueError(f"adapter {adapter_dir} was trained from checkpoint {recorded['path']} (SHA-256 "
                         f"{recorded['sha256']}): set backbone.checkpoint=DIR to that checkpoint")
    actual = checkpoint_identity(given)
    if recorded.get("architectures") and actual["architectures"] != recorded["architectures"]:
        raise ValueError(f"backbone.checkpoint={given} holds {actual['architectures']}, but adapter {adapter_dir} was "
                         f"trained on {recorded['architectures']} ({recorded['path']})")
    if actual["sha256"] != recorded["sha256"]:
        raise ValueError(f"backbone.checkpoint={given} is not the checkpoint adapter {adapter_dir} was trained from: "
                         f"its identity (config.json, weight index, weight file names and sizes) has SHA-256 "
                         f"{actual['sha256']}, the adapter recorded {recorded['sha256']} for {recorded['path']} "
                         f"(weights {actual['weights']} here, {recorded.get('weights')} there)")
    say = log or (lambda message: None)
    if recorded.get("weights_sha256") and actual["weights_sha256"] != recorded["weights_sha256"]:
        say(f"[aurora] warning: the weights of backbone.checkpoint={given} (SHA-256 {actual['weights_sha256']}) are "
            f"not those adapter {adapter_dir} was trained on: {recorded['path']} (SHA-256 {recorded['weights_sha256']}); "
            "same config and file sizes, other values (another fine-tuning of the same model?)")
    elif actual["path"] != recorded["path"]:
        say(f"[aurora] warning: backbone.checkpoint={given} is not where adapter {adapter_dir} was trained from "
            f"({recorded['path']})" + (": same weights" if recorded.get("weights_sha256") else ""))


def check_tokenizer(record: dict, source: tuple[str, str], adapter_dir):
    """The tokenizer about to be used must have the files the adapter was trained with."""
    recorded = record.get("tokenizer")
    if recorded is None:
        return  # trained on synthetic token ids: nothing recorded to hold it to
    actual = tokenizer_identity(source[1])
    if actual != recorded["sha256"]:
        raise ValueError(f"{source[0]}={source[1]}: this tokenizer's files have SHA-256 {actual}, but adapter "
                         f"{adapter_dir} was trained with the tokenizer of {recorded['source']}, SHA-256 {recorded['sha256']}")


def check_preprocessing(record: dict, prep: dict, adapter_dir, where: str):
    """Images must be normalised and resampled as in training (``where``: whose values ``prep`` are)."""
    recorded = record["preprocessing"]
    mine = {"mean": [float(m) for m in prep["mean"]], "std": [float(s) for s in prep["std"]], "resample": prep["resample"]}
    theirs = {k: recorded[k] for k in mine}
    if mine != theirs:
        raise ValueError(f"image preprocessing of {where} is {mine}, but adapter {adapter_dir} was trained with {theirs}")


def check_evaluation(record: dict, cfg, adapter_dir, tokenizer: tuple[str, str], log=None):
    """What an adapter records, held against an evaluation before the backbone is built (its
    backbone, task and media are checked first, by ``check_fits``): checkpoint identity, the
    tokenizer about to be used (``tokenizer``: its config key and directory), image
    preprocessing, the run directory the adapter sits in, if any."""
    from .data import preprocessing

    check_checkpoint(record, cfg, adapter_dir, log)
    check_tokenizer(record, tokenizer, adapter_dir)
    where = (f"backbone.checkpoint={cfg.backbone.checkpoint} (preprocessor_config.json)" if cfg.backbone.checkpoint
             else f"the {cfg.backbone.name} defaults")
    check_preprocessing(record, preprocessing(cfg), adapter_dir, where)
    check_run_directory(record, adapter_dir)


def check_run_directory(record: dict, adapter_dir):
    """Where the adapter sits in a run directory, that run's configuration, tokenizer and answer
    list must be those of the adapter's record: an adapter copied into another run is refused."""
    run = RunDir.of_adapter(adapter_dir)
    if run is None:
        return
    state = _run_state(run, adapter_dir)
    config = json.loads(state.read_text()).get("config") or {} if state else {}
    for key in DEFINING_KEYS:
        mine, theirs = _get(record["config"], key), _get(config, key)
        if theirs is not None and mine != theirs:
            raise ValueError(f"adapter {adapter_dir} records {key}={mine!r}, but its run directory's {state} has "
                             f"{theirs!r}: the adapter belongs to another run (evaluate a copy kept elsewhere)")
    tokenizer = record.get("tokenizer") or {}
    if tokenizer.get("trained") and run.tokenizer.is_dir() and tokenizer_identity(run.tokenizer) != tokenizer["sha256"]:
        raise ValueError(f"adapter {adapter_dir} carries a tokenizer (SHA-256 {tokenizer['sha256']}) other than its run "
                         f"directory's {run.tokenizer} (SHA-256 {tokenizer_identity(run.tokenizer)})")
    if record.get("answer_list") and run.answer_list.is_file():
        mine, theirs = file_digest(Path(adapter_dir) / record["answer_list"]), file_digest(run.answer_list)
        if mine != theirs:
            raise ValueError(f"adapter {adapter_dir} carries an answer list (SHA-256 {mine['sha256']}) other than "
                             f"its run directory's {run.answer_list} (SHA-256 {theirs['sha256']})")


def _run_state(run: RunDir, adapter_dir) -> Path | None:
    """The ``trainer_state.json`` that speaks for an adapter's run: its own checkpoint's
    (``checkpoints/step_N/adapter``), else the run's newest checkpoint's."""
    own = Path(adapter_dir).resolve().parent / "trainer_state.json"
    if own.is_file():
        return own
    found = sorted(run.checkpoints.glob("step_*/trainer_state.json"))
    return found[-1] if found else None


def _get(config: dict, key: str):
    section, _, name = key.partition(".")
    value = config.get(section)
    return value.get(name) if name and isinstance(value, dict) else value
