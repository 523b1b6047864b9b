"""The one training loop, for every stage.

Gradient accumulation, bf16 autocast, AdamW with linear warmup and cosine decay, gradient
clipping, evaluation and checkpoints every N steps, exact resume, a progress bar, a metrics CSV
and a loss plot. Data-parallel when started under `torchrun` / `accelerate launch` (WORLD_SIZE > 1):
each process takes its own slice of every global batch; the single-process path is the same code.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from train import state as saved
from train.logs import MetricsLog
from train.stage import Stage, to_device
from vlm.errors import ConfigError


@dataclass(frozen=True)
class TrainConfig:
    out: str = "runs/run"
    """Run folder: checkpoints/, metrics.csv, eval.csv, loss.png and final/ go here."""
    steps: int = 100
    """Optimizer steps to train for."""
    batch_size: int = 8
    """Samples per micro-batch (per process)."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    lr: float = 1e-3
    """Peak learning rate."""
    weight_decay: float = 0.0
    warmup_steps: int = 0
    """Linear warmup steps before the cosine decay."""
    min_lr_ratio: float = 0.1
    """The cosine decays to lr * min_lr_ratio at the last step."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this (0 turns clipping off)."""
    precision: str = "auto"
    """`bf16` autocast, `fp32`, or `auto`: bf16 on a GPU, fp32 on a CPU (bf16 matmuls are ~20x slower
    than fp32 on CPUs without AVX512-BF16/AMX). Never fp16 (slow on CPU, unstable without scaling)."""
    eval_every: int = 0
    """Evaluate every N steps (0: only at the end)."""
    save_every: int = 0
    """Write a resumable checkpoint every N steps (0: only at the end)."""
    keep_last: int = 2
    """How many resumable checkpoints to keep."""
    keep_best: str = ""
    """Also keep the model of the best evaluation by this metric in best/ (e.g. auroc/val/mean; higher
    is better, except for names ending in `loss`). Select on validation metrics, never on test ones."""
    seed: int = 0
    group_by_length: bool = False
    """Batch records of similar length (each epoch's shuffle is cut into windows of 64 batches, each
    window sorted by length, the batches shuffled again): less padding, the same records per epoch.
    For stages that measure records (align, instruct)."""
    tensorboard: bool = False
    """Also log to TensorBoard (needs the tensorboard package)."""
    skip_bad: bool = False
    """Drop invalid data records (and count them) instead of refusing to start."""
    device: str = "auto"
    """cpu, cuda[:N], or auto."""

    def validate(self) -> "TrainConfig":
        if self.steps < 1 or self.batch_size < 1 or self.grad_accum < 1:
            raise ConfigError("steps, batch_size and grad_accum must be at least 1.")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"precision must be auto, bf16 or fp32, got {self.precision!r}.")
        if not 0 <= self.min_lr_ratio <= 1 or self.lr <= 0:
            raise ConfigError("lr must be > 0 and min_lr_ratio in [0, 1].")
        return self


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based): warmup, then cosine."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class DataOrder:
    """Which records make each batch: a seeded permutation per epoch, consumed in order.

    Its position (epoch, offset) is saved with checkpoints, so a resumed run sees exactly the
    batches an uninterrupted run would have seen. With `lengths`, batches hold records of similar
    length (see TrainConfig.group_by_length).
    """

    WINDOW_BATCHES = 64

    def __init__(self, size: int, batch: int, seed: int, rank: int = 0, world: int = 1,
                 lengths: list[int] | None = None):
        if size < batch * world:
            raise ConfigError(f"the training set has {size} records, fewer than one batch ({batch * world}).")
        self.size, self.batch, self.seed, self.rank, self.world = size, batch, seed, rank, world
        self.lengths = None if lengths is None else torch.tensor(lengths)  # converted once, not every batch
        self.epoch, self.offset = 0, 0
        self._cached: tuple[int, torch.Tensor] | None = None  # (epoch, its order): built once per epoch, not per batch

    def epoch_order(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(self.size, generator=generator)
        if self.lengths is None:
            return order
        global_batch = self.batch * self.world
        window = self.WINDOW_BATCHES * global_batch
        grouped = torch.cat([w[torch.argsort(self.lengths[w], descending=True, stable=True)]
                             for w in order.split(window)])
        full = self.size // global_batch * global_batch  # the ragged tail stays last, to be dropped
        batches = grouped[:full].view(-1, global_batch)
        batches = batches[torch.randperm(len(batches), generator=generator)]
        return torch.cat([batches.flatten(), grouped[full:]])

    def next_indices(self) -> list[int]:
        global_batch = self.batch * self.world
        if self.offset + global_batch > self.size:  # drop the ragged tail, start a new epoch
            self.epoch, self.offset = self.epoch + 1, 0
        if self._cached is None or self._cached[0] != self.epoch:
            self._cached = (self.epoch, self.epoch_order(self.epoch))
        chunk = self._cached[1][self.offset: self.offset + global_batch]
        self.offset += global_batch
        return chunk[self.rank * self.batch: (self.rank + 1) * self.batch].tolist()


@dataclass
class TrainState:
    """What the loop threads through every optimizer step: the model it runs (DDP-wrapped when
    data-parallel), the trained parameters, optimizer, schedule, data position, device and precision.
    `step` counts optimizer steps done; a checkpoint restores it with the rest."""

    model: nn.Module
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    order: DataOrder
    device: torch.device
    bf16: bool
    step: int = 0


def train(stage: Stage, cfg: TrainConfig, resume: bool = True) -> Path:
    """Train `stage` per `cfg`; return the folder of the final model checkpoint."""
    cfg.validate()
    rank, world, device = _distributed_setup(cfg.device)
    out = Path(cfg.out)
    with saved.run_lock(out) if rank == 0 else contextlib.nullcontext():
        return _train(stage, cfg, resume, rank, world, device, out)


def _train(stage: Stage, cfg: TrainConfig, resume: bool, rank: int, world: int, device, out: Path) -> Path:
    torch.manual_seed(cfg.seed)
    model = stage.build_model().to(device)
    train_set, val_set = stage.datasets()
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError(f"stage {stage.name!r}: nothing to train (every parameter is frozen).")
    # A stage may give parts of the model a fraction of the lr (`lr_scale`); the schedule scales all.
    groups = stage.param_groups(model) if hasattr(stage, "param_groups") else [{"params": params, "lr_scale": 1.0}]
    optimizer = torch.optim.AdamW([{"params": g["params"], "lr": cfg.lr * g["lr_scale"]} for g in groups],
                                  lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    order = DataOrder(len(train_set), cfg.batch_size, cfg.seed, rank, world, lengths=_lengths(stage, train_set, cfg))
    step = 0
    latest = saved.latest(out) if resume else None
    if latest is not None:
        step = saved.restore(latest, stage, model, optimizer, scheduler, order)
    wrapped = _wrap_ddp(model, device) if world > 1 else model
    state = TrainState(wrapped, params, optimizer, scheduler, order, device, use_bf16(cfg.precision, device), step)
    log = MetricsLog(out, enabled=rank == 0, tensorboard=cfg.tensorboard, resume_step=step)
    bar = tqdm(total=cfg.steps, initial=step, desc=f"train {stage.name}", unit="step", disable=rank != 0)
    while state.step < cfg.steps:
        row = _optimizer_step(stage, state, train_set, cfg)
        step = state.step
        log.train(step, order.epoch, row)
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.4f}", samples_s=f"{row['samples_per_s']:.1f}",
                        tokens_s=f"{row['tokens_per_s']:.0f}")
        last = step == cfg.steps
        if cfg.eval_every and step % cfg.eval_every == 0 and not last:
            _evaluate(stage, model, val_set, step, log, out, cfg.keep_best if rank == 0 else "")
        if rank == 0 and ((cfg.save_every and step % cfg.save_every == 0) or last):
            saved.write(out, step, stage, model, optimizer, scheduler, order, cfg.keep_last)
    bar.close()
    _evaluate(stage, model, val_set, step, log, out, cfg.keep_best if rank == 0 else "")
    final = out / "final"
    if rank == 0:
        saved.write_model(stage, model, final)
        log.close()
    return final


def _evaluate(stage, model, val_set, step: int, log: MetricsLog, out: Path, keep_best: str) -> None:
    """Log an evaluation; with `keep_best`, write the model to best/ when the metric improves."""
    import json

    metrics = stage.evaluate(model, val_set)
    log.eval(step, metrics)
    if not keep_best:
        return
    if keep_best not in metrics:
        raise ConfigError(f"keep_best {keep_best!r} is not among the evaluation metrics: {', '.join(metrics) or 'none'}.")
    record = out / "best.json"
    previous = json.loads(record.read_text()) if record.is_file() else None
    lower = keep_best.endswith("loss")
    value = float(metrics[keep_best])
    if previous is None or (value < previous["value"] if lower else value > previous["value"]):
        saved.write_model(stage, model, out / "best")
        record.write_text(json.dumps({"metric": keep_best, "value": value, "step": step}, indent=2))


def _lengths(stage: Stage, train_set, cfg: TrainConfig) -> list[int] | None:
    if not cfg.group_by_length:
        return None
    if not hasattr(stage, "record_length"):
        raise ConfigError(f"stage {stage.name!r} cannot group by length: its records have no length (drop group_by_length).")
    return [stage.record_length(record) for record in train_set]


def _optimizer_step(stage: Stage, state: TrainState, train_set, cfg: TrainConfig) -> dict:
    """One optimizer step of `cfg.grad_accum` micro-batches; advances `state` (its step, the data
    position, the schedule) and returns the step's metrics row."""
    state.model.train()
    device, optimizer = state.device, state.optimizer
    start = time.perf_counter()
    loss_sum, samples, tokens, extra = 0.0, 0, 0, {}
    for _ in range(cfg.grad_accum):
        batch = to_device(stage.collate([train_set[i] for i in state.order.next_indices()]), device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=state.bf16):
            stats = stage.step(state.model, batch)
        (stats.loss / cfg.grad_accum).backward()
        loss_sum += float(stats.loss.detach()) / cfg.grad_accum
        samples, tokens = samples + stats.samples, tokens + stats.tokens
        extra = stats.extra
    grad_norm = torch.nn.utils.clip_grad_norm_(state.params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))
    lr = optimizer.param_groups[0]["lr"]
    optimizer.step()
    state.scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    state.step += 1
    seconds = time.perf_counter() - start
    return {"loss": loss_sum, "lr": lr, "grad_norm": float(grad_norm), "samples_per_s": samples / seconds,
            "tokens_per_s": tokens / seconds, "seconds": seconds, "peak_mem_mib": peak_memory_mib(device), **extra}


def peak_memory_mib(device: torch.device) -> float:
    """Peak memory so far: allocated GPU memory on CUDA, the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def use_bf16(precision: str, device: torch.device) -> bool:
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def process_device(requested: str) -> torch.device:
    """The device this process trains on: under torchrun its LOCAL_RANK's GPU (or the CPU), else
    `requested` (auto: cuda when there is one). A stage that must place its model itself while
    loading it (a 4-bit model is quantized onto its device) asks this."""
    cuda = torch.cuda.is_available() and not requested.startswith("cpu")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if cuda else "cpu")
    if requested == "auto":
        return torch.device("cuda" if cuda else "cpu")
    return torch.device(requested)


def _distributed_setup(requested: str) -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = process_device(requested)
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        return dist.get_rank(), world, device
    return 0, 1, device


def _wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=False)
