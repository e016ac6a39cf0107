"""Two ways to run the same training step: DeepSpeed (ZeRO-3 etc.) or a plain single process.

Both build the optimizer and the warmup+cosine schedule the same way, scale the loss for
gradient accumulation the same way and clip the same global norm, so the plain path is an
exact reference for the DeepSpeed one. They differ only in where parameters live, which is
what full_values / swapped / checkpoints hide.
"""

from __future__ import annotations

import collections
import contextlib
import math
import os

import torch

from ..aurora import as_one_call
from ..dist import compute_device, sum_over_ranks
from ..backbones import PRECISIONS


def to_device(batch: dict, device) -> dict:
    """Tensors of a batch dict onto the compute device (lists of strings stay as they are)."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def make_optimizer(cfg, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """AdamW (weight decay on matrices only, as BLIP) or plain SGD (exact equivalence tests).
    AdamW is fused where the parameters' device has the kernel: one op updates every tensor
    (a GPU launches one kernel per chunk of tensors, where foreach launches one per update
    stage and chunk), and an adapter's ~200 small tensors cost no Python per tensor."""
    if cfg.optim.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.optim.lr)
    decay = [p for p in params if len(getattr(p, "ds_shape", p.shape)) >= 2]
    rest = [p for p in params if all(p is not q for q in decay)]
    groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    fused = all(p.device.type in ("cuda", "cpu") for p in params)
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.optim.lr, betas=(0.9, 0.999), fused=fused)


@torch.no_grad()
def swap_values(params, values) -> list[torch.Tensor]:
    """Put ``values`` into ``params``; return what was there (exactly, in model dtype). Two
    foreach copies for all tensors: the momentum model is swapped in and out every step, and
    a copy per tensor launched four kernels per step for each of an adapter's ~200 tensors."""
    old = [torch.empty_like(p) for p in params]
    torch._foreach_copy_(old, params)
    torch._foreach_copy_(params, values)
    return old


def lr_lambda(warmup: int, total: int):
    """Linear warmup, then cosine to zero at ``total`` optimizer steps."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


# The objective's modes that run in every training step: captured when engine.compile is on.
STEP_MODES = ("train", "momentum")
EAGER_CALLS = 2  # per mode before the compiled step: one learns the readers, the next lays their weights out
# (model interface, task) whose step is captured whole (tested). BLIP's QA step has a varying
# number of answers per question; BLIP-2's Q-Former attention mask does not trace.
CAPTURED = {("blip", "retrieval")}


def compile_step(cfg, device: torch.device) -> bool:
    """Whether the training step's forward and backward run as captured graphs (engine.compile).
    ``auto``: on a GPU, where a step of a BLIP-sized model costs what it launches and CUDA
    graphs launch it at once; not on a CPU, where compiling takes longer than it saves."""
    from ..backbones import get_spec

    if (get_spec(cfg.backbone.name).interface, cfg.objective.task) not in CAPTURED:
        return False
    return cfg.engine.compile == "on" or (cfg.engine.compile == "auto" and device.type == "cuda")


class PlainBackend:
    """One process, no DeepSpeed: the reference implementation of a training step.

    With engine.compile the objective's training modes run through ``torch.compile`` in
    full-graph mode (an error, not a silent fallback, where the step cannot be captured whole),
    CUDA graphs on a GPU; the step number goes in as a tensor so that no step recompiles. Each
    mode's first ``EAGER_CALLS`` calls run eagerly: the adapted layers learn there which of them
    read one input together and lay their frozen weights side by side, which the traced graph
    then runs as one (``InputSharing._traced_together``). The step is traced as one call of
    the adapted model (``as_one_call``), so what Aurora makes once per call is made once for it.
    """

    distributed = False

    def __init__(self, model, cfg, total_steps: int):
        self.cfg = cfg
        dtype = PRECISIONS[cfg.engine.precision]
        self.device = compute_device()
        self.module = model.to(dtype).to(self.device)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(cfg, self.params)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg.optim.warmup_steps, total_steps))
        self.micro = 0
        self.compiled, self.eager_calls = None, collections.Counter()
        if compile_step(cfg, self.device):
            mode = "reduce-overhead" if self.device.type == "cuda" else None
            self.compiled = torch.compile(as_one_call(self.module, self.module), fullgraph=True, mode=mode)

    def begin_step(self):
        """A new micro-batch: CUDA graphs may now reuse the memory of the previous one's outputs."""
        if self.compiled is not None and self.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()

    def forward(self, batch, *args):
        batch = to_device(batch, self.device)
        if self.compiled is not None and len(args) > 1 and args[1] in STEP_MODES:
            if self.eager_calls[args[1]] == EAGER_CALLS:
                step, *rest = args
                return self.compiled(batch, torch.tensor(step, device=self.device), *rest)
            self.eager_calls[args[1]] += 1
        return self.module(batch, *args)

    def backward(self, loss):
        (loss / self.cfg.optim.grad_accum).backward()

    def step(self):
        """Optimizer step at the accumulation boundary, as DeepSpeed's engine.step()."""
        self.micro += 1
        if self.micro % self.cfg.optim.grad_accum:
            return
        if self.cfg.optim.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.optim.clip_grad)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def full_values(self, params) -> list[torch.Tensor]:
        """fp32 values of the parameters: the parameters themselves where they are fp32 (read
        them before changing the parameters, or copy them)."""
        return [p.detach().float() for p in params]

    def exchange(self, params, values) -> list[torch.Tensor]:
        return swap_values(params, values)

    set_values = exchange

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(), "micro": self.micro}

    def load_state_dict(self, state: dict):
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.micro = state["micro"]


class DeepSpeedBackend:
    """The frozen backbone and the Aurora parameters inside a DeepSpeed engine."""

    distributed = True

    def __init__(self, model, cfg, total_steps: int, ds_config: dict):
        import deepspeed

        self.cfg = cfg
        params = [p for p in model.parameters() if p.requires_grad]
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model,
            model_parameters=params,
            optimizer=make_optimizer(cfg, params),
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.optim.warmup_steps, total_steps)),
            config=ds_config,
        )
        self.module = self.engine.module
        self.zero3 = self.engine.zero_optimization_stage() == 3
        # DeepSpeed does not move a model built under zero.Init: the objective's own state
        # (buffers created outside it, e.g. the feature queue) would stay on the CPU.
        place_buffers(self.module, self.engine.device)

    def begin_step(self):
        pass

    def forward(self, batch, *args):
        return self.engine(to_device(batch, self.engine.device), *args)

    def backward(self, loss):
        self.engine.backward(loss)

    def step(self):
        self.engine.step()

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def full_values(self, params) -> list[torch.Tensor]:
        """Full fp32 values of (partitioned) trainable parameters, each a new tensor; collective on
        all ranks. Read every step by the EMA: where ZeRO-1/2 maps each tensor to fragments of
        the masters, one sum over the ranks for all tensors (:func:`_whole_masters`), where
        DeepSpeed's helper sums each tensor apart."""
        if not self.zero3 and all(hasattr(p, "_hp_mapping") for p in params):
            return _whole_masters(params)
        from deepspeed.utils import safe_get_full_fp32_param

        return [safe_get_full_fp32_param(p).detach().float() for p in params]

    def exchange(self, params, values) -> list[torch.Tensor]:
        """Put ``values`` into the model's copy of ``params``; return what was there.

        Under ZeRO-3 the forward reads the partitioned low-precision copies, so this goes
        through GatheredParameters with a modifier rank (re-partitioned on exit). The fp32
        master weights are not touched: used for the EMA swap, which must restore exactly.
        """
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters(params, modifier_rank=0) if self.zero3 else contextlib.nullcontext()
        with gathered:
            return swap_values(params, values)

    def set_values(self, params, values):
        """Overwrite trainable parameters everywhere: the model copy and the fp32 master."""
        from deepspeed.utils import safe_set_full_fp32_param

        self.exchange(params, values)
        for p, v in zip(params, values):
            if self.zero3:
                _set_zero3_master(p, v)
            else:
                safe_set_full_fp32_param(p, v.float())


@torch.no_grad()
def _whole_masters(params) -> list[torch.Tensor]:
    """ZeRO-1/2: each rank holds a fragment of each tensor's fp32 master (``_hp_mapping``, as
    DeepSpeed's ``safe_get_full_fp32_param`` reads it). Laid at their places in one zero buffer,
    the fragments of every tensor are made whole by one sum over the ranks: one collective and
    three ops a step, not one collective and two ops per tensor."""
    sizes = [p.numel() for p in params]
    flat = torch.zeros(sum(sizes), dtype=torch.float32, device=params[0].device)
    places, fragments = [], []
    for p, part in zip(params, flat.split(sizes)):
        mapping = p._hp_mapping  # None where this rank holds none of it
        if mapping is not None:
            address = mapping.lp_fragment_address
            places.append(part.narrow(0, address.start, address.numel))
            fragments.append(mapping.get_hp_fragment().view(-1))
    if places:
        torch._foreach_copy_(places, fragments)
    return [part.view_as(p) for p, part in zip(params, sum_over_ranks(flat).split(sizes))]


def _set_zero3_master(param, value):
    """This rank's slice of a ZeRO-3 parameter's fp32 master copy.

    DeepSpeed's safe_set_full_fp32_param slices the unpadded value and fails when a parameter
    has fewer elements than ranks (e.g. a 1-element gate on 2 ranks); the partition is padded,
    so slice a padded copy instead.
    """
    opt = param._z3_optimizer
    part, _ = opt._get_fp32_opt_state_partition(param, release_swap_buffers=False, optim_state_key=None)
    n, owner = part.numel(), opt._get_param_partition_rank(param)
    flat = value.detach().flatten().float().to(part.device)
    chunk = flat[owner * n:(owner + 1) * n]
    part.data.zero_()
    part.data[: chunk.numel()].copy_(chunk)


def place_buffers(module: torch.nn.Module, device) -> None:
    """Every buffer of ``module`` onto ``device``, dtypes unchanged; then, under
    ``AURORA_STRICT_DEVICES=1``, refuse any buffer or parameter left elsewhere (ZeRO-3
    parameters excepted: DeepSpeed places their partitions, on the CPU when offloading)."""
    device = torch.device(device)
    for sub in module.modules():
        for name, buf in sub._buffers.items():
            if buf is not None and buf.device != device:
                sub._buffers[name] = buf.to(device)
    if os.environ.get("AURORA_STRICT_DEVICES", "0") == "1":
        for name, t in [*module.named_parameters(), *module.named_buffers()]:
            if not hasattr(t, "ds_tensor") and t.device.type != device.type:
                raise RuntimeError(f"AURORA_STRICT_DEVICES: {name} is on {t.device}, the engine computes on {device}")


def secondary_parameter_bytes(model) -> int:
    """Bytes of ZeRO++ hierarchical partitioning's secondary partition on this rank: the copy
    split inside the node that backward gathers read (0 without hpZ)."""
    secondary = (getattr(p, "ds_secondary_tensor", None) for p in model.parameters())
    return sum(t.numel() * t.element_size() for t in secondary if t is not None)


def local_parameter_bytes(model) -> int:
    """Bytes of parameters held by this rank (the partition under ZeRO-3)."""
    total = 0
    for p in model.parameters():
        local = getattr(p, "ds_tensor", None)
        total += (local.numel() * local.element_size()) if local is not None else p.numel() * p.element_size()
    return total
