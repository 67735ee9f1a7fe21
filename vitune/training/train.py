"""Training: one importable loop over the stages of a config, made of named steps.

    train(cfg, data, out) -> TrainResult  all stages, then OUT/model (the usable model folder)
      prepare_data -> build_tokenizer -> build_model -> run_stage (per stage) -> save_pretrained

Each stage says which parts train and at which learning rates (AdamW groups, warmup + cosine).
Gradient accumulation normalises the loss by the target tokens of the whole accumulated batch.
The state is saved at each stage end, every `save_every` steps and every `save_every_minutes`
(default 10), on Ctrl-C / SIGTERM (guard.py), and before a step whose loss or gradient is not
finite (which stops the run: the step is never applied). `resume=True` continues from the state,
after checking the config and data are the saved run's (run_folder.py), and reproduces the
uninterrupted run's losses and weights exactly.

Under torchrun (distributed.py, docs/distributed.md) each process trains on its share of every batch
(DDP, or FSDP2 with `train.distributed=fsdp`); process 0 alone logs and writes, and the state is saved
with torch.distributed.checkpoint, so a run resumes with any number of processes.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from vitune.checkpoints.model_folder import save_pretrained
from vitune.checkpoints.pretrained import build_vlm, pretrained_tokenizer
from vitune.checkpoints.training_state import (
    Position,
    has_state,
    load_state,
    read_position,
    read_saved_run,
    save_state,
)
from vitune.config import Config, ConfigError, StageConfig, TrainConfig, dump_yaml
from vitune.data.dataset import (
    BatchOrder,
    TrainSet,
    conversation_texts,
    encode_trainset,
    make_batch,
    pack_trainset,
)
from vitune.data.processor import Batch, ImageTransform
from vitune.data.tokenizer import Tokenizer, byte_level, train_bpe
from vitune.files import atomic_write_text
from vitune.model.vlm import VLM
from vitune.training import distributed
from vitune.training.distributed import ALONE, World
from vitune.training.guard import SaveClock, StopSignals, TrainingError
from vitune.training.metrics_log import MetricsLog
from vitune.training.run_folder import check_out, check_resume, clear_run
from vitune.training.stage_data import Prepared, prepare_data, with_image_stats

Log = Callable[[str], None]


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but this machine (or this torch build) has no CUDA; use auto or cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("train.device=mps but MPS is not available here; use auto or cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_tokenizer(cfg: Config, texts: list[str]) -> Tokenizer:
    tk = cfg.model.tokenizer
    if cfg.model.lm_pretrained:  # the pretrained LM's own tokenizer, `<image>` added
        return pretrained_tokenizer(cfg.model)
    if tk.kind == "byte":
        return byte_level()
    # the chat templates' own words (role names) are part of every rendered sample
    return train_bpe(texts + ["system\n", "user\n", "assistant\n"] * 100, tk.vocab_size)


def build_model(cfg: Config, tok: Tokenizer) -> VLM:
    # A pretrained LM keeps its table: the added `<image>` id lies past it (LM.embed clamps it).
    m = cfg.model if cfg.model.lm_pretrained else replace(cfg.model, lm=replace(cfg.model.lm, vocab_size=tok.vocab_size))
    # the instruction encoder reads the same token ids (all of them, `<image>` included)
    text = replace(m.fusion.text, vocab_size=tok.vocab_size, pad_id=tok.special.eos)
    ctext = replace(m.contrastive.text, vocab_size=tok.vocab_size, pad_id=tok.special.eos)
    m = replace(m, fusion=replace(m.fusion, text=text), contrastive=replace(m.contrastive, text=ctext))
    return build_vlm(m, tok.special.image)  # pretrained parts: config and weights from their checkpoints


def stage_steps(stage: StageConfig, n_rows: int) -> int:
    if stage.steps > 0:
        return stage.steps
    per_step = min(stage.batch_size, n_rows) * stage.grad_accum
    return max(1, math.ceil(stage.epochs * n_rows / per_step))


def lr_factor(step: int, total: int, stage: StageConfig) -> float:
    """Linear warmup to 1, then cosine to `min_lr_ratio`."""
    if step < stage.warmup_steps:
        return (step + 1) / stage.warmup_steps
    t = (step - stage.warmup_steps) / max(1, total - stage.warmup_steps)
    return stage.min_lr_ratio + (1 - stage.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def build_optimizer(model: VLM, stage: StageConfig, tc: TrainConfig) -> torch.optim.AdamW:
    groups = model.param_groups()
    lrs = {"vision": stage.lr_vision, "fusion": stage.lr_fusion, "connector": stage.lr_connector, "lm": stage.lr_lm,
           "lora": stage.lr_lora, "contrastive": stage.lr_contrastive}
    for part, params in groups.items():
        for p in params:
            p.requires_grad_(part in stage.train)
    param_groups = []
    for part in stage.train:
        decay = [p for p in groups[part] if p.ndim >= 2]
        no_decay = [p for p in groups[part] if p.ndim < 2]
        param_groups += [{"params": decay, "lr": lrs[part], "base_lr": lrs[part], "weight_decay": tc.weight_decay},
                         {"params": no_decay, "lr": lrs[part], "base_lr": lrs[part], "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in param_groups if g["params"]], betas=(0.9, 0.95))


Gather = Callable[[torch.Tensor], torch.Tensor]  # rows of every process, concatenated (distributed.gather_rows)


def stage_loss(model: VLM, b: Batch, stage: StageConfig, n_targets: int, n_parts: int,
               gather: Gather | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """lm_weight * LM loss (normalised over the accumulated batch's targets) + contrastive_weight *
    InfoNCE over this micro-batch's pairs (split in `n_parts` shares: micro-batches x processes; under
    torchrun `gather` collects every process's pairs); also the InfoNCE term alone (its share of the
    step), or None. With both weights set the tower runs twice per
    micro-batch (the alignment head reads it unconditioned); cheap for the small from-scratch
    towers this is used with, and a place to share features if a large tower ever needs it."""
    loss, nce = torch.zeros((), device=b.input_ids.device), None
    if stage.lm_weight > 0:
        lm, _ = model(b.input_ids, b.labels, b.pixel_values, n_targets=n_targets, segments=b.segments,
                      instructions=b.instructions)
        loss = loss + stage.lm_weight * lm
    if stage.contrastive_weight > 0:
        assert b.pairs is not None
        nce = model.contrastive_loss(b.pixel_values[b.pairs.image], (b.pairs.ids, b.pairs.mask), b.pairs.group,
                                     gather) / n_parts
        loss = loss + stage.contrastive_weight * nce
    return loss, nce


class StageLoss(nn.Module):
    """One micro-batch's loss as a module: DDP and FSDP act on a module's forward, so all of a step's
    computation goes through this one. Under FSDP, when some process's rows hold images, every
    process gives the trainable image parts a zero term, so that all reduce the same gradients (a
    process whose rows hold none would otherwise have none for them)."""

    def __init__(self, model: VLM, world: World = ALONE):
        super().__init__()
        self.model, self.world = model, world

    def forward(self, b: Batch, stage: StageConfig, n_targets: int, n_parts: int,
                images_anywhere: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.world.size == 1:
            return stage_loss(self.model, b, stage, n_targets, n_parts)
        loss, nce = stage_loss(self.model, b, stage, n_targets, n_parts, distributed.gather_rows)
        if images_anywhere and distributed.is_sharded(self):
            groups = self.model.param_groups()
            loss = loss + sum(0.0 * p.sum() for part in ("vision", "fusion", "connector")
                              for p in groups[part] if p.requires_grad)
        return loss, nce


@dataclass
class StageRun:
    """What one stage needs to run: its data, order, optimizer and step counts."""

    index: int
    stage: StageConfig
    data: TrainSet
    order: BatchOrder
    optimizer: torch.optim.AdamW
    total: int


def train_step(net: nn.Module, run: StageRun, step: int, cfg: Config, transform: ImageTransform,
               pad_id: int, device: torch.device, world: World = ALONE) -> tuple[float, float | None, int, int]:
    """One optimizer step over `grad_accum` micro-batches; returns (loss, its InfoNCE part or None,
    tokens, samples). `net`: the StageLoss (under DDP, its wrapper). Under torchrun each process
    takes its share of every micro-batch, the loss is normalised by the whole global batch's target
    tokens, and the returned figures are the sums over the processes."""
    stage, tc = run.stage, cfg.train
    for g in run.optimizer.param_groups:
        g["lr"] = g["base_lr"] * lr_factor(step, run.total, stage)
    micro = [make_batch(run.data, world.share(run.order.indices(step * stage.grad_accum + a)), transform, pad_id)
             for a in range(stage.grad_accum)]
    n_targets, *n_images = world.sum([sum(b.n_targets for b in micro), *(len(b.pixel_values) for b in micro)])
    total_loss, total_nce = 0.0, None
    for a, b in enumerate(micro):
        with distributed.grad_sync(net, a == len(micro) - 1):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=tc.precision == "bf16"):
                loss, nce = net(b.to(device), stage, int(n_targets), len(micro) * world.size, n_images[a] > 0)
            world.scale(loss).backward()
        total_loss += loss.item()
        if nce is not None:
            total_nce = (total_nce or 0.0) + nce.item()
    total_loss, nce_sum, tokens, samples = world.sum([total_loss, total_nce or 0.0,
                                                      sum(int(b.input_ids.numel()) for b in micro),
                                                      sum(b.input_ids.shape[0] for b in micro)])
    params = [p for g in run.optimizer.param_groups for p in g["params"] if p.grad is not None]
    norm = distributed.clip_grads(net, params, tc.grad_clip, world)
    if not (math.isfinite(total_loss) and math.isfinite(norm)):
        run.optimizer.zero_grad(set_to_none=True)
        raise NonFinite(f"loss {total_loss}, gradient norm {norm}")
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    return total_loss, None if total_nce is None else nce_sum, int(tokens), int(samples)


class NonFinite(ArithmeticError):
    """A step's loss or gradient is NaN or infinite (the step was not applied)."""


@dataclass(frozen=True)
class TrainResult:
    model: Path | None      # the model folder; None when the run stopped early (`stop_after`)
    state: Path             # the training state folder (OUT/state)
    global_step: int

    @property
    def stopped(self) -> bool:
        return self.model is None


def _start(cfg: Config, prep: Prepared, out: Path, resume: bool, allow_change: bool, log: Log) -> Position | None:
    """Where the run begins: the saved position once the saved run fits, or None: from the start
    (also for `--resume` of a run killed before its first save, so a kill-and-resume loop works)."""
    state_dir = out / "state"
    if resume and not has_state(state_dir):
        if (out / "model").exists():
            raise ConfigError(f"--resume: {out} holds a model but no training state ({state_dir}) to continue from; "
                              "pass --overwrite to train afresh (replacing that model), or another --out")
        log(f"--resume: no training state saved in {state_dir} yet: starting from the beginning")
        resume = False
    if not resume:
        clear_run(out)
        return None
    saved, saved_data = read_saved_run(state_dir)
    diffs = check_resume(saved, saved_data, cfg, prep.fingerprints, allow_change, state_dir)
    for d in diffs:
        log(f"warning: resuming with a change (--allow-config-change): {d}")
    return read_position(state_dir)


def train(cfg: Config, data: dict[str, str], out: str | Path, resume: bool = False,
          image_root: str | None = None, stop_after: int | None = None, log: Log = print,
          progress: bool = True, overwrite: bool = False, allow_outside_images: bool = False,
          allow_config_change: bool = False) -> TrainResult:
    """Run every stage; returns where the model and state are. `stop_after` (global steps) stops
    early with the state saved, as a kill would (without losing the step). Under torchrun every
    process calls it (as `python -m vitune train` does) and all get the same result."""
    world, device = distributed.join(pick_device(cfg.train.device))
    threads = torch.get_num_threads()
    try:
        distributed.check(cfg, world)
        world.on_main(check_out, Path(out), resume, overwrite)
        if cfg.train.threads > 0:
            torch.set_num_threads(cfg.train.threads)
        clock = SaveClock(cfg.train.save_every, cfg.train.save_every_minutes)
        ctx = RunContext(cfg, None, device, Path(out), None, clock, {}, world.quiet(log), progress and world.main,
                         world)
        return _train(ctx, data, resume, image_root, stop_after, allow_outside_images, allow_config_change)
    finally:
        torch.set_num_threads(threads)  # a library call leaves the process as it found it
        distributed.leave(world)


def _train(ctx: RunContext, data: dict[str, str], resume: bool, image_root: str | None, stop_after: int | None,
           allow_outside_images: bool, allow_config_change: bool) -> TrainResult:
    cfg, out, log, world = ctx.cfg, ctx.out, ctx.log, ctx.world
    seed_everything(cfg.train.seed)
    prep = prepare_data(cfg, data, image_root, log, allow_outside_images)
    ctx.cfg = cfg = with_image_stats(cfg, prep, log)
    ctx.fingerprints, state_dir = prep.fingerprints, out / "state"
    start = world.on_main(_start, cfg, prep, out, resume, allow_config_change, log)
    resume, pos = start is not None, start or Position()
    ctx.tok = tok = Tokenizer.load(state_dir) if resume else _new_tokenizer(cfg, prep, world)
    model = world.local_first(build_model, cfg, tok).to(device=ctx.device)
    net = StageLoss(model, world)
    distributed.shard(net, model, world, cfg)
    ctx.metrics = world.main_only(_open_outputs, cfg, out, pos.global_step if resume else 0)
    try:
        with StopSignals() as stop:
            pos = _run_stages(net, prep, pos, resume, stop_after, ctx, stop)
    finally:
        if ctx.metrics is not None:
            ctx.metrics.close()
    if stop_after is not None and pos.global_step >= stop_after and not _finished(pos, cfg):
        log(f"stopped after {pos.global_step} steps; continue with --resume")
        return TrainResult(None, state_dir, pos.global_step)
    if prep.bad.skipped:
        log(f"{prep.bad.skipped} bad record(s) skipped in total (see the messages above)")
    whole = distributed.full_model(model, world)  # FSDP: assembled from the shards, on process 0
    world.main_only(save_pretrained, whole, tok, out / "model", cfg)
    return TrainResult(out / "model", state_dir, pos.global_step)


def _new_tokenizer(cfg: Config, prep: Prepared, world: World) -> Tokenizer:
    """Built on process 0 and handed to the others (a trained BPE is then the same in all)."""
    texts = conversation_texts([c for cs in prep.convs for c in cs])
    if world.size == 1:
        return build_tokenizer(cfg, texts)
    return Tokenizer.from_str(world.on_main(lambda: build_tokenizer(cfg, texts).to_str()))


def _open_outputs(cfg: Config, out: Path, truncate_after: int) -> MetricsLog:
    atomic_write_text(out / "config.yaml", dump_yaml(cfg))
    return MetricsLog(out, truncate_after=truncate_after)


def _finished(pos: Position, cfg: Config) -> bool:
    return pos.stage >= len(cfg.train.stages)


@dataclass
class RunContext:
    """What every stage of one run shares (`tok` and `metrics` are set once made; `metrics` is None
    but in process 0)."""

    cfg: Config
    tok: Tokenizer | None
    device: torch.device
    out: Path
    metrics: MetricsLog | None
    clock: SaveClock
    fingerprints: dict[str, str]
    log: Log
    progress: bool
    world: World = ALONE

    def save(self, model: VLM, optimizer: torch.optim.Optimizer, pos: Position) -> None:
        """Under torchrun a collective (every process writes its shards)."""
        assert self.tok is not None
        save_state(self.out / "state", model, optimizer, pos, self.tok, self.cfg, self.fingerprints)
        self.clock.saved()

    def write(self, row: dict) -> None:
        if self.metrics is not None:
            self.metrics.write(row)


def _run_stages(net: StageLoss, prep: Prepared, pos: Position, resume: bool, stop_after: int | None,
                ctx: RunContext, stop: StopSignals) -> Position:
    cfg, tc, tok, state_dir, model = ctx.cfg, ctx.cfg.train, ctx.tok, ctx.out / "state", net.model
    assert tok is not None
    transform = ImageTransform.for_vision(cfg.model.vision)
    loaded = not resume
    for si, stage in enumerate(tc.stages):
        if si < pos.stage:
            continue
        ts = encode_trainset(prep.convs[si], tok, stage.template, transform, model.n_image_tokens,
                             cfg.model.lm.max_seq_len, prep.bad, cfg.model.system_prompt,
                             instruction_len=model.cfg.fusion.text.max_len if model.needs_instruction else 0,
                             caption_len=model.cfg.contrastive.text.max_len if stage.contrastive_weight > 0 else 0,
                             name=f"stage {stage.name!r} ({prep.files[stage.name]})")
        if stage.packing == "shared_prefix":
            n_samples = len(ts)
            ts = pack_trainset(ts, cfg.model.lm.max_seq_len, tok.special.image)
            ctx.log(f"stage {stage.name!r}: {n_samples} samples packed into {len(ts)} rows (shared prefix)")
        order = BatchOrder([len(r[0]) for r in ts.rows], stage.batch_size, tc.seed + si, tc.group_by_length)
        distributed.check_batch(si, stage, order.bs, ctx.world)
        run = StageRun(si, stage, ts, order, build_optimizer(model, stage, tc), stage_steps(stage, len(ts)))
        start = pos.step if si == pos.stage else 0
        if ctx.world.any([stop.requested])[0]:
            raise stop.interrupted(f"stopped before stage {stage.name!r}; the state of the stages before it is in "
                                   f"{state_dir}: continue with the same command and --resume")
        if start >= run.total:
            pos = Position(si + 1, 0, pos.global_step)
            continue
        if not loaded:
            load_state(state_dir, model, run.optimizer if start > 0 else None)
            loaded = True
        with distributed.replicate(net, ctx.world, cfg) as step_net:
            pos = run_stage(step_net, model, run, start, pos.global_step, ctx, stop_after, stop)
        if stop_after is not None and pos.global_step >= stop_after:
            return pos if pos.step < run.total else Position(si + 1, 0, pos.global_step)
        pos = Position(si + 1, 0, pos.global_step)
    if not loaded:  # every stage was already complete in the saved state
        load_state(state_dir, model, None)
    return pos


def run_stage(net: nn.Module, model: VLM, run: StageRun, start: int, global_step: int, ctx: RunContext,
              stop_after: int | None, stop: StopSignals) -> Position:
    """Steps `start..total` of one stage (`net`: what a step calls, see train_step). The state is
    saved when the clock says so, at the stage end, at `stop_after`, when a signal asks to stop (any
    process's, under torchrun), and before a non-finite step."""
    stage, cfg, tok = run.stage, ctx.cfg, ctx.tok
    assert tok is not None
    ctx.log(f"stage {run.index + 1}/{len(cfg.train.stages)} {stage.name!r}: {len(run.data)} rows, "
            f"{run.total} steps, training {', '.join(stage.train)}")
    model.train()
    transform = ImageTransform.for_vision(cfg.model.vision)
    bar = tqdm(total=run.total, initial=start, desc=stage.name, disable=not ctx.progress, dynamic_ncols=True)
    pos = Position(run.index, start, global_step)
    t0, tok_count = time.perf_counter(), 0
    for step in range(start, run.total):
        try:
            loss, nce, n_tok, n_samples = train_step(net, run, step, cfg, transform, tok.special.eos, ctx.device,
                                                     ctx.world)
        except NonFinite as e:
            ctx.save(model, run.optimizer, pos)
            raise TrainingError(
                f"stage {stage.name!r} step {step + 1} (global step {pos.global_step + 1}): {e}; the step was not "
                f"applied and the state before it is saved in {ctx.out / 'state'}. Lower the learning rate (or "
                "check the data), then resume with --resume --allow-config-change") from None
        tok_count += n_tok
        pos = Position(run.index, step + 1, pos.global_step + 1)
        dt = time.perf_counter() - t0
        ctx.write({"stage": stage.name, "step": step + 1, "global_step": pos.global_step, "loss": loss,
                   "contrastive_loss": nce, "lr": run.optimizer.param_groups[0]["lr"], "tokens_per_s": tok_count / dt})
        bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tok_count / dt:.0f}")
        bar.update(1)
        stopping = stop_after is not None and pos.global_step >= stop_after
        signalled, due = ctx.world.any([stop.requested, ctx.clock.due(step + 1)])
        if stopping or signalled or step + 1 == run.total or due:
            ctx.save(model, run.optimizer, pos)
        if signalled:
            bar.close()
            raise stop.interrupted(f"the state after global step {pos.global_step} is saved in {ctx.out / 'state'}; "
                                   "continue with the same command and --resume")
        if stopping:
            break
    bar.close()
    return pos
