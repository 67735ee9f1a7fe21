"""Distributed training under torchrun: the process group, each process's share of a batch, the
wrapped model (DDP, or FSDP2 per decoder block) and the few collectives the loop needs.

    torchrun --nproc_per_node 2 -m vitune train --preset tiny --data ... --out runs/x   (docs/distributed.md)

A plain `vitune train` is a world of one (`ALONE`): every helper here is then a no-op and the run is
the single-process run. Under torchrun every process
- takes a disjoint share (`World.share`) of every micro-batch the one-process run takes, so the union
  over the processes is exactly that batch;
- normalises its LM loss by the target tokens of the whole global batch (`World.sum`) and scales it by
  the world size before backward (`World.scale`): DDP and FSDP average the processes' gradients, and
  their sum is the one-process gradient;
- agrees with the others on when to stop and save (`World.any`), so all join every save.
Process 0 alone logs, shows progress and writes files; `World.on_main` runs a function there and
hands its result, or its error, to every process.
"""

from __future__ import annotations

import contextlib
import math
import os
import pickle
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from vitune.config import Config, ConfigError, StageConfig
from vitune.model.vlm import VLM

Log = Callable[[str], None]


@dataclass(frozen=True)
class World:
    """This process's place in the run: rank, world size, local rank (its GPU) and collective device."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: str = "cpu"        # where collectives' tensors live: cpu (gloo) or cuda:LOCAL_RANK (nccl)
    owns_group: bool = False   # this process started the group (and so ends it)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def share(self, rows: list[int]) -> list[int]:
        """This process's rows of a global micro-batch: every `size`-th one from `rank` (strided, so
        that with length-grouped batches each process gets a similar mix of lengths)."""
        return rows if self.size == 1 else rows[self.rank::self.size]

    def sum(self, values: list[float]) -> list[float]:
        """Each value summed over the processes (float64)."""
        if self.size == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def any(self, flags: list[bool]) -> list[bool]:
        """Each flag true in some process."""
        if self.size == 1:
            return flags
        t = torch.tensor([int(f) for f in flags], dtype=torch.int32, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return [bool(x) for x in t.tolist()]

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """What to backward: the share times the world size (DDP / FSDP divide the summed gradient by it)."""
        return loss if self.size == 1 else loss * self.size

    def on_main(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """`fn(*args, **kwargs)` on process 0; every process returns its result or raises its error."""
        return self._on_main(fn, args, kwargs, share=True)

    def main_only(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """`fn(*args, **kwargs)` on process 0, whose result stays there (None elsewhere); its error is
        raised in every process. Also a barrier."""
        return self._on_main(fn, args, kwargs, share=False)

    def _on_main(self, fn: Callable[..., Any], args: tuple, kwargs: dict, share: bool) -> Any:
        if self.size == 1:
            return fn(*args, **kwargs)
        box: list[Any] = [None]
        result = None
        if self.main:
            try:
                result = fn(*args, **kwargs)
                box = [("ok", result if share else None)]
            except Exception as e:
                box = [("error", _picklable(e))]
                dist.broadcast_object_list(box, src=0)
                raise
        dist.broadcast_object_list(box, src=0)
        kind, value = box[0]
        if kind == "error":
            raise value
        return value if share else result

    def local_first(self, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(*args)` in every process, first in each machine's process 0 (LOCAL_RANK 0), then in the
        others: what it caches on a machine's disk (a converted pretrained LM) is made once."""
        if self.size == 1:
            return fn(*args)
        result, error = None, None
        if self.local_rank == 0:
            try:
                result = fn(*args)
            except Exception as e:
                error = e
        failed: list[Any] = [None] * self.size
        dist.all_gather_object(failed, error is not None)
        if error is not None:
            raise error
        if any(failed):
            raise RuntimeError("another process failed (see its error) while preparing what this one needs")
        return fn(*args) if self.local_rank != 0 else result

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def quiet(self, log: Log) -> Log:
        """`log` on process 0, nothing elsewhere."""
        return log if self.main else (lambda s: None)


ALONE = World()


def _picklable(e: Exception) -> Exception:
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:
        return RuntimeError(f"{type(e).__name__}: {e}")


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name, str(default))
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"environment variable {name}={text!r} is not an integer (torchrun sets it)") from None


def join(device: torch.device) -> tuple[World, torch.device]:
    """The world this process is in, from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR, MASTER_PORT), and its device (cuda:LOCAL_RANK on GPUs). Starts the process group
    (nccl on CUDA, gloo on CPU) unless the caller already did."""
    if _env_int("WORLD_SIZE", 1) <= 1 and not dist.is_initialized():
        return ALONE, device
    local = _env_int("LOCAL_RANK", 0)
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise ConfigError(f"train.device={device.type}: distributed training runs on cuda (nccl) or cpu (gloo)")
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
    return World(dist.get_rank(), dist.get_world_size(), local, str(device), owns), device


def leave(world: World) -> None:
    if world.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def check(cfg: Config, world: World) -> None:
    """Before any work: the config fits the world (FSDP needs several processes; every stage's batch
    splits evenly across them)."""
    if cfg.train.distributed == "fsdp" and world.size == 1:
        raise ConfigError("train.distributed=fsdp shards the model across the processes of a torchrun launch, but "
                          "this is a single process: launch with `torchrun --nproc_per_node N -m vitune train ...` "
                          "(N >= 2), or set train.distributed=ddp")
    for i, s in enumerate(cfg.train.stages):
        check_batch(i, s, s.batch_size, world)


def check_batch(index: int, stage: StageConfig, rows: int, world: World) -> None:
    """`rows`: the global micro-batch (batch_size, or all of a smaller stage's rows)."""
    if rows % world.size == 0:
        return
    lo, hi = rows // world.size * world.size, (rows // world.size + 1) * world.size
    fit = f"{lo} or {hi}" if lo else f"{hi}"
    short = "" if rows == stage.batch_size else f" (the stage has only {rows} rows, which make its batch)"
    raise ConfigError(f"train.stages.{index}.batch_size: the global batch of stage {stage.name!r} is {rows} rows"
                      f"{short}, which {world.size} processes cannot share evenly: set train.stages.{index}."
                      f"batch_size to a multiple of {world.size} (e.g. {fit}), or launch a number of processes "
                      f"that divides {rows}")


def shard(net: nn.Module, model: VLM, world: World, cfg: Config) -> None:
    """FSDP2 (`fully_shard`): each decoder block its own unit, the rest of the model (and the loss
    module `net` around it) the root. In place, once, before any optimizer is built. Scalar
    parameters (the alignment head's temperature), which FSDP cannot shard, stay whole in every
    process; `clip_grads` averages their gradients."""
    if world.size == 1 or cfg.train.distributed != "fsdp":
        return
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh(torch.device(world.device).type, (world.size,))
    scalars = {p for p in net.parameters() if p.ndim == 0}
    for block in model.lm.layers:
        fully_shard(block, mesh=mesh, ignored_params=scalars)
    fully_shard(net, mesh=mesh, ignored_params=scalars)


def is_sharded(net: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule
    return isinstance(net, FSDPModule)


@contextlib.contextmanager
def replicate(net: nn.Module, world: World, cfg: Config) -> Iterator[nn.Module]:
    """For one stage, what to call: `net` under DDP (built after the stage set which parameters
    train, since DDP syncs those it sees at construction), or `net` itself (one process, FSDP).
    `find_unused_parameters`: a process whose rows hold no image leaves the tower unused."""
    if world.size == 1 or is_sharded(net):
        yield net
        return
    from torch.nn.parallel import DistributedDataParallel as DDP
    device = torch.device(world.device)
    ddp = DDP(net, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)
    try:
        yield ddp
    finally:
        ddp._remove_autograd_hooks()  # the next stage wraps the same parameters again


@contextlib.contextmanager
def grad_sync(net: nn.Module, enabled: bool) -> Iterator[None]:
    """Gradient accumulation: no cross-process reduction of gradients but on the last micro-batch."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    if isinstance(net, DDP) and not enabled:
        with net.no_sync():
            yield
        return
    if is_sharded(net):
        net.set_requires_gradient_sync(enabled)  # type: ignore[operator]
    yield


def as_float(x: torch.Tensor) -> float:
    """A scalar, also from a DTensor (FSDP's gradient norm)."""
    from torch.distributed.tensor import DTensor
    return float(x.full_tensor() if isinstance(x, DTensor) else x)


def clip_grads(net: nn.Module, params: list[nn.Parameter], max_norm: float, world: World) -> float:
    """Clip the gradients to `max_norm` (0: do not) and return their norm before clipping, as
    `torch.nn.utils.clip_grad_norm_` does. Under FSDP the gradients are shards (DTensors) but for
    the parameters it left whole, whose gradients are averaged over the processes here first."""
    if not is_sharded(net):
        return as_float(torch.nn.utils.clip_grad_norm_(params, max_norm) if max_norm > 0
                        else torch.nn.utils.get_total_norm([p.grad for p in params]))
    from torch.distributed.tensor import DTensor
    whole = [p for p in net.parameters() if not isinstance(p, DTensor) and p.requires_grad]
    for p, used in zip(whole, world.any([p.grad is not None for p in whole])):
        if used:  # in some process: those without a gradient add zeros
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            dist.all_reduce(grad)
            p.grad = grad / world.size
    seen = {id(p) for p in params}
    grads = [p.grad for p in [*params, *(p for p in whole if id(p) not in seen)] if p.grad is not None]
    groups = [[g for g in grads if isinstance(g, DTensor)], [g for g in grads if not isinstance(g, DTensor)]]
    norm = math.sqrt(sum(as_float(torch.nn.utils.get_total_norm(gs)) ** 2 for gs in groups if gs))
    if max_norm > 0:
        coef = min(1.0, max_norm / (norm + 1e-6))
        for g in grads:
            g.mul_(coef)
    return norm


class _GatherRows(torch.autograd.Function):
    """All processes' rows, concatenated in rank order; the backward hands each its rows' summed gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.n = dist.get_rank(), x.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous()
        dist.all_reduce(grad)  # every process computed the same loss over all rows
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """`(n, ...)` from each process -> `(world * n, ...)`, differentiable for floating tensors."""
    if x.is_floating_point():
        return _GatherRows.apply(x)
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def full_model(model: VLM, world: World) -> VLM | None:
    """The whole model on process 0 for its model folder (None elsewhere): the model itself unless
    FSDP sharded it; then a CPU copy assembled from the shards (a collective: all processes call it)."""
    from torch.distributed.tensor import DTensor
    if not any(isinstance(p, DTensor) for p in model.parameters()):
        return model if world.main else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not world.main:
        return None
    whole = VLM(model.cfg, model.image_token_id)
    whole.load_state_dict(state, strict=True)
    return whole
