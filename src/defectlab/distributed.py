"""Data-parallel training over several processes and machines, launched by ``torchrun``.

``defectlab train ... --distributed`` (or ``api.train(..., distributed=True)``) runs once per
process that ``torchrun`` starts; :func:`init_from_env` joins them into one process group:
``gloo`` on CPU, ``nccl`` on CUDA (process ``LOCAL_RANK`` of a machine uses
``cuda:LOCAL_RANK``).

**Why not DistributedDataParallel.** Models are not ``nn.Module``\\ s: each owns its networks
and optimisers and steps them inside ``training_step``. GANs have several networks and
optimisers and several backward passes per step, which breaks the DDP wrapper's
one-forward-one-backward assumption. So data parallelism is done with ``torch.distributed``
directly, where every model steps: the optimisers.

**How** (:func:`sync_model`). After ``setup_training`` (and after a resume load) every
parameter and buffer of every ``nn.Module`` attribute of the model is broadcast from rank 0,
so all ranks start from the same weights. Every ``torch.optim.Optimizer`` attribute (alone,
or in a list, tuple or dict) gets a step pre-hook that, just before the optimiser steps,
replaces the ``.grad`` of each of its parameters by ``Σ_r w_r · grad_r`` over the ranks r:
one flat buffer per dtype and optimiser, one ``SUM`` all-reduce (gloo has no ``AVG`` for
every dtype; the weights make a sum an average). ``w_r`` is the share of the global batch
that rank r trained on (:class:`GradientSync.weight`, set by :func:`defectlab.training.fit`),
so for a loss that is a mean over the batch the result is the gradient of the whole batch,
even when shards differ in size. A parameter without a gradient on some ranks counts as
zeros there, so every rank runs the same collective; one without a gradient on every rank
keeps ``grad = None`` and the optimiser skips it, as in one process. Every rank then applies
the same gradient to the same weights with the same optimiser state: weights stay identical
without being sent again. A model that changes weights outside its optimisers from its own
shard (``flow``'s ActNorm initialises itself from the first batch) would break that, so
after every step :meth:`GradientSync.check_parameters` compares a checksum of the weights
across ranks and re-broadcasts rank 0's weights when they differ.

**Batches** (:func:`defectlab.training.fit`). Every rank computes the same seeded global
batch order; within a global batch (ordered by label, so defect images spread evenly over
the ranks) rank r takes items ``r::world_size``. The global batch size stays ``batch_size``,
so training approximates one process with the same batch size, exactly so (up to
floating-point rounding) for mean losses without BatchNorm or randomness. ``batch_size``
must be at least the number of processes; when the last batch of an epoch has fewer images
than there are ranks, a rank left without one trains on a copy of one with weight 0: it runs
the same optimiser steps (so the collectives match) and contributes nothing to the gradient.

**Everything else a rank computes from its shard** — BatchNorm running statistics, a
model's own statistics (``deepsvdd``'s centre, ``mlaae``'s score normalisers, ``ae``'s pixel
level) — is made common at defined points: before every checkpoint floating-point buffers
are averaged over the ranks (the average of per-shard BatchNorm statistics is the statistic
of the whole batch; integer buffers come from rank 0), and at the end of every epoch and of
training rank 0's whole model state is broadcast to the others, so every epoch starts, and
the run ends, with one model on every rank. Losses are averaged the way gradients are, so
the loss history is the same on every rank. Rank 0 alone writes files.

**Random numbers.** Rank 0 draws from the single-process stream; rank r > 0 from one seeded
by (seed, r), so augmentation and noise differ between shards. Checkpoints keep every
rank's generator state: a resume with as many processes continues each stream exactly.

**Requirements and failure.** Every rank must call the same optimisers' ``step`` the same
number of times per training step (true of every built-in model; a model that may skip a
step decides it with :func:`any_rank`). A model without an optimiser (statistics models:
``pixelstats``, ``canny``, ``template``, ``patchmemory``, ``ensemble``) has no gradient
training to distribute and is refused. When one rank fails, ``torchrun`` stops the others.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from defectlab.base import Model
from defectlab.errors import ConfigError
from defectlab.runs import resolve_device

#: what ``torchrun`` sets in every process it starts
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")

#: relative difference of the weight checksums above which ranks count as diverged
PARAMETER_TOLERANCE = 1e-6


@dataclass(frozen=True)
class Context:
    """This process's place in the group, and whether :func:`shutdown` should end it."""

    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: torch.device
    owns_group: bool


# --- the process group ---------------------------------------------------------------------


def _env_int(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError as exc:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer") from exc


def init_from_env(device: str = "auto", timeout_s: float = 1800.0) -> Context:
    """Join the process group described by torchrun's environment variables.

    ``device`` is the run's device setting: when it resolves to CUDA this process uses
    ``cuda:LOCAL_RANK`` and the ``nccl`` backend, otherwise the CPU and ``gloo``. A group
    that is already initialised (by the caller) is used as it is and left open.
    """
    missing = [name for name in TORCHRUN_VARIABLES if name not in os.environ]
    if missing:
        raise ConfigError(
            f"--distributed needs the environment torchrun sets ({', '.join(missing)} missing): "
            "launch with torchrun --nproc_per_node N -m defectlab train ... --distributed "
            "(see README, multi-node training)"
        )
    if not dist.is_available():
        raise ConfigError("this torch build has no torch.distributed support")
    rank, world_size = _env_int("RANK"), _env_int("WORLD_SIZE")
    local_rank = _env_int("LOCAL_RANK")
    if world_size < 1 or not 0 <= rank < world_size or local_rank < 0:
        raise ConfigError(f"RANK={rank}, WORLD_SIZE={world_size}, LOCAL_RANK={local_rank}")
    resolved = resolve_device(device)
    if resolved.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"LOCAL_RANK {local_rank} but this machine has {torch.cuda.device_count()} "
                "CUDA GPUs: start at most one process per GPU (--nproc_per_node)"
            )
        torch_device, backend = torch.device("cuda", local_rank), "nccl"
        torch.cuda.set_device(torch_device)
    else:
        torch_device, backend = torch.device("cpu"), "gloo"
    if dist.is_initialized():
        return Context(
            dist.get_rank(),
            dist.get_world_size(),
            local_rank,
            str(dist.get_backend()),
            torch_device,
            owns_group=False,
        )
    dist.init_process_group(
        backend=backend,
        init_method="env://",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
        device_id=torch_device if backend == "nccl" else None,
    )
    return Context(rank, world_size, local_rank, backend, torch_device, owns_group=True)


def shutdown(context: Context, wait_s: float = 60.0) -> None:
    """Leave the process group if :func:`init_from_env` created it. On gloo the ranks first
    wait for one another (at most ``wait_s``), so no rank tears its connections down while
    another still talks to it; a rank that failed or left only shortens the wait."""
    if context.owns_group and dist.is_initialized():
        if context.backend == "gloo":
            # another rank failed or left already: leave anyway
            with contextlib.suppress(RuntimeError):
                dist.monitored_barrier(timeout=datetime.timedelta(seconds=wait_s))
        dist.destroy_process_group()


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world() -> int:
    """Number of processes training together (1 outside a process group)."""
    return dist.get_world_size() if is_initialized() else 1


def rank() -> int:
    """This process's rank (0 outside a process group)."""
    return dist.get_rank() if is_initialized() else 0


def is_main() -> bool:
    """True on the process that writes files and prints: rank 0, or the only process."""
    return rank() == 0


def launched_rank() -> int:
    """The rank torchrun gave this process (0 when not started by torchrun); readable
    before the group exists and after it is gone."""
    return int(os.environ.get("RANK", "0") or 0)


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def _comm_device() -> torch.device:
    """Where collectives need their tensors: the current GPU for nccl, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# --- small collectives models and the trainer use ------------------------------------------

#: gradient syncs now open: models' collectives (all_sum, any_rank) act only while one is
_open_syncs = 0


def all_sum(value: float) -> float:
    """Sum of ``value`` over the ranks during distributed training, else ``value``: for a
    model that needs a whole-batch quantity (the global batch size) inside training_step."""
    if not (_open_syncs and is_initialized()):
        return float(value)
    tensor = torch.tensor([float(value)], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return float(tensor.item())


def any_rank(flag: bool) -> bool:
    """True when ``flag`` is true on at least one rank: for a decision (such as skipping an
    optimiser step) that every rank must take together."""
    return all_sum(1.0 if flag else 0.0) > 0


def gather(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank."""
    if not is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (the argument is ignored on the others)."""
    if not is_initialized():
        return obj
    payload = [obj if is_main() else None]
    dist.broadcast_object_list(payload, src=0, device=_comm_device())
    return payload[0]


def all_reduce_losses(losses: dict[str, float], weight: float = 1.0) -> dict[str, float]:
    """Average of every rank's losses, weighted like the gradients (by batch share).

    A key some ranks did not report is averaged over those that did; the result, and so
    the loss history, is the same on every rank. A NaN on any rank makes the average NaN.
    """
    if not is_initialized():
        return dict(losses)
    reports = gather((float(weight), {k: float(v) for k, v in losses.items()}))
    keys = list(dict.fromkeys(k for _, report in reports for k in report))
    out = {}
    for key in keys:
        pairs = [(w, report[key]) for w, report in reports if key in report]
        total = sum(w for w, _ in pairs)
        out[key] = (
            sum(w * v for w, v in pairs) / total
            if total > 0
            else sum(v for _, v in pairs) / len(pairs)
        )
    return out


def _unique(tensors: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    return list({id(t): t for t in tensors}.values())


def _module_tensors(model: Model) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    modules = model.all_networks()
    parameters = _unique(p for m in modules for p in m.parameters())
    buffers = _unique(b for m in modules for b in m.buffers())
    return parameters, buffers


def _optimizer_parameters(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return _unique(p for group in optimizer.param_groups for p in group["params"])


# --- flat collectives over many tensors ----------------------------------------------------


def _by_dtype(tensors: list[torch.Tensor]) -> Iterator[list[torch.Tensor]]:
    """Tensors grouped by dtype, groups and members in a rank-independent order."""
    groups: dict[torch.dtype, list[torch.Tensor]] = {}
    for tensor in tensors:
        groups.setdefault(tensor.dtype, []).append(tensor)
    yield from groups.values()


def _flatten(tensors: list[torch.Tensor]) -> torch.Tensor:
    """One contiguous copy on the communication device (bool carried as uint8: gloo and
    nccl do not reduce bool)."""
    wire = torch.uint8 if tensors[0].dtype == torch.bool else tensors[0].dtype
    return torch.cat([t.detach().reshape(-1).to(_comm_device(), wire) for t in tensors])


@torch.no_grad()
def _unflatten_into(flat: torch.Tensor, tensors: list[torch.Tensor]) -> None:
    offset = 0
    for tensor in tensors:
        n = tensor.numel()
        tensor.copy_(flat[offset : offset + n].view(tensor.shape).to(tensor.dtype))
        offset += n


def broadcast_tensors(tensors: list[torch.Tensor]) -> None:
    """Overwrite ``tensors`` in place with rank 0's values."""
    for group in _by_dtype(tensors):
        flat = _flatten(group)
        dist.broadcast(flat, src=0)
        _unflatten_into(flat, group)


def average_buffers(model: Model) -> None:
    """Average the floating-point buffers of the model's networks over the ranks (e.g.
    BatchNorm running statistics) and give every rank rank 0's other buffers.

    Computed as ``b_0 + Σ_r (b_r − b_0) / world``, so buffers that are equal on every rank
    (frozen pretrained statistics) stay bit-for-bit what they were.
    """
    if not is_initialized():
        return
    _, buffers = _module_tensors(model)
    floating = [b for b in buffers if b.is_floating_point()]
    broadcast_tensors([b for b in buffers if not b.is_floating_point()])
    for group in _by_dtype(floating):
        flat = _flatten(group)
        base = flat.clone()
        dist.broadcast(base, src=0)
        delta = flat - base
        dist.all_reduce(delta, op=dist.ReduceOp.SUM)
        _unflatten_into(base + delta / dist.get_world_size(), group)


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_to_cpu(v) for v in value)
    return value


def broadcast_state(model: Model) -> None:
    """Load rank 0's ``model.state_dict()`` (weights and the model's own statistics) on
    every other rank: one model everywhere, the one rank 0 saves."""
    if not is_initialized():
        return
    state = broadcast_object(_to_cpu(model.state_dict()) if is_main() else None)
    if not is_main():
        model.load_state_dict(state)


# --- gradient synchronisation ----------------------------------------------------------------


@torch.no_grad()
def all_reduce_gradients(parameters: list[torch.Tensor], weight: float) -> None:
    """Replace each parameter's gradient by ``Σ_r weight_r · grad_r`` over the ranks.

    A missing gradient counts as zeros; a parameter with no gradient on any rank keeps
    ``grad = None``. One flat buffer per dtype: the gradients, then one presence count per
    parameter.
    """
    for group in _by_dtype(parameters):
        for p in group:
            if p.grad is not None and p.grad.is_sparse:
                raise ConfigError("distributed training does not support sparse gradients")
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in group]
        flat = _flatten(grads).mul_(weight)
        present = torch.tensor(
            [p.grad is not None for p in group], dtype=flat.dtype, device=flat.device
        )
        buffer = torch.cat([flat, present])
        dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
        counts = buffer[len(flat) :].tolist()
        offset = 0
        for p, count in zip(group, counts, strict=True):
            n = p.numel()
            if count > 0:
                reduced = buffer[offset : offset + n].view(p.shape).to(p.device, p.dtype)
                if p.grad is None:
                    p.grad = reduced.clone()
                else:
                    p.grad.copy_(reduced)
            offset += n


class GradientSync:
    """Step pre-hooks on a model's optimisers that all-reduce gradients before each step.

    ``weight`` is this rank's share of the current global batch; :meth:`close` removes the
    hooks (after training the model steps on its own again).
    """

    def __init__(self, optimizers: list[torch.optim.Optimizer]) -> None:
        global _open_syncs
        self.optimizers = optimizers
        self.weight = 1.0
        self.resyncs = 0
        self._handles = [opt.register_step_pre_hook(self._hook()) for opt in optimizers]
        self._open = True
        _open_syncs += 1

    def _hook(self) -> Callable[[torch.optim.Optimizer, Any, Any], None]:
        def before_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            all_reduce_gradients(_optimizer_parameters(optimizer), self.weight)

        return before_step

    def parameters(self) -> list[torch.Tensor]:
        return _unique(p for opt in self.optimizers for p in _optimizer_parameters(opt))

    @torch.no_grad()
    def check_parameters(self) -> bool:
        """Re-broadcast rank 0's trained weights if the ranks' weights differ (a model
        changed them outside its optimisers); True when it had to."""
        parameters = self.parameters()
        total = torch.stack(
            [torch.linalg.vector_norm(p.detach(), dtype=torch.float64) for p in parameters]
        ).sum()
        extremes = torch.stack([total, -total]).to(_comm_device())
        dist.all_reduce(extremes, op=dist.ReduceOp.MAX)
        high, low = float(extremes[0]), -float(extremes[1])
        if high - low <= PARAMETER_TOLERANCE * max(abs(high), 1e-30):
            return False
        broadcast_tensors(parameters)
        self.resyncs += 1
        return True

    def close(self) -> None:
        global _open_syncs
        if self._open:
            self._open = False
            _open_syncs -= 1
        for handle in self._handles:
            handle.remove()
        self._handles = []


def sync_model(model: Model) -> GradientSync:
    """Give every rank rank 0's weights and buffers and hook the model's optimisers.

    Call after ``setup_training`` (and after loading a checkpoint to resume). Refuses a
    model without an optimiser: it has no gradients to average.
    """
    optimizers = model.all_optimizers()
    if not optimizers:
        raise ConfigError(
            f"{model.name} has no gradient training to distribute (no optimiser: it "
            "accumulates statistics in one pass over the images); train it without "
            "--distributed"
        )
    parameters, buffers = _module_tensors(model)
    broadcast_tensors(parameters + buffers)
    return GradientSync(optimizers)
