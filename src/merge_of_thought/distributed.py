"""Spreading a round's branches over the processes of ``torchrun`` / ``accelerate launch``, and gathering them.

A round's branches are independent until the merge, so with N processes branch k of every round goes to process
``k % N``, which trains it as a plain single-process SFTTrainer with the seed it has in a single-process run. The
merge is the only collective: every process gathers every branch's LoRA factors (the A and B matrices, never a full
``out x in`` delta) and runs the same :func:`~merge_of_thought.merging.merge_round` in teacher order, so every
process holds the identical merged student. Process 0 alone writes the run folder.

Why MoT hides the launcher from transformers and accelerate: under a launcher (``WORLD_SIZE > 1``) they would set
up data parallelism over ALL processes, wrap each branch's model in DistributedDataParallel and average its
gradients with processes that are training other teachers' branches (or none). So, when a :class:`MoTConfig` is
created under a launcher, :func:`detach_from_launcher` takes the process-group variables (RANK, WORLD_SIZE,
LOCAL_RANK, ...) out of ``os.environ`` for the rest of the process, and MoT's own collectives run on a private gloo
group (:class:`MoTProcessGroup`) that ``torch.distributed``'s default group, and therefore accelerate, never sees.
The factors are fp32 CPU tensors already (:mod:`.adapters`), so gloo serves GPU runs too.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import pickle
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from transformers import TrainingArguments

from .adapters import AdapterWeights

logger = logging.getLogger(__name__)

T = TypeVar("T")

# What torchrun (and accelerate launch, which runs torchrun) sets per process and transformers/accelerate read to
# decide on data parallelism. MASTER_ADDR/MASTER_PORT and TORCHELASTIC_* stay: only a process group reads them.
LAUNCHER_VARIABLES = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "GROUP_WORLD_SIZE",
    "ROLE_RANK",
    "ROLE_WORLD_SIZE",
)


@dataclass(frozen=True)
class LauncherEnv:
    """This process's place in the launch, as the launcher set it."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    local_world_size: int = 1  # the processes on this machine, which share its cores and GPUs


_launcher: LauncherEnv | None = None
_group: MoTProcessGroup | None = None


def detach_from_launcher() -> LauncherEnv | None:
    """Under a launcher, record this process's rank and hide the launch from transformers and accelerate.

    Called by :class:`MoTConfig` before its device set-up, so every TrainingArguments and Trainer that MoT builds
    afterwards is single-process. Idempotent; returns ``None`` outside a launcher (``WORLD_SIZE`` unset or 1).
    """
    global _launcher
    if _launcher is not None:
        return _launcher
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    if dist.is_available() and dist.is_initialized():
        raise RuntimeError(
            "torch.distributed was initialized before the MoTConfig was created (by init_process_group, an "
            "accelerate Accelerator/PartialState, or a TrainingArguments built under the launcher). MoT spreads "
            "whole branches over the processes and trains each one in a single process, so create the MoTConfig "
            "first, before anything sets up data parallelism."
        )
    for flag in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP"):
        if os.environ.get(flag, "false").lower() == "true":
            raise ValueError(f"{flag}=true: MoT does not shard a branch; launch with a plain multi-GPU config.")
    missing = [v for v in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        unset = ", ".join(missing)
        raise RuntimeError(f"WORLD_SIZE>1 but {unset} unset: launch MoT with torchrun or accelerate launch.")
    _launcher = LauncherEnv(
        rank=int(os.environ["RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]),
        local_rank=int(os.environ["LOCAL_RANK"]),
        master_addr=os.environ["MASTER_ADDR"],
        master_port=int(os.environ["MASTER_PORT"]),
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"])),
    )
    for variable in LAUNCHER_VARIABLES:
        os.environ.pop(variable, None)
    if torch.cuda.is_available():
        torch.cuda.set_device(pinned_device())
    return _launcher


def launcher() -> LauncherEnv | None:
    """This process's place in the launch that :func:`detach_from_launcher` recorded; ``None`` without one."""
    return _launcher


def pinned_device() -> torch.device | None:
    """``cuda:LOCAL_RANK`` for a process started by a launcher on a GPU machine; ``None`` otherwise."""
    if _launcher is None or not torch.cuda.is_available():
        return None
    return torch.device("cuda", _launcher.local_rank % torch.cuda.device_count())


@contextlib.contextmanager
def device_setup_on_pinned_gpu() -> Iterator[None]:
    """Build TrainingArguments (an SFTConfig, a MoTConfig) inside this, and its device set-up stays on this
    process's GPU.

    transformers' set-up of a single-process run calls ``torch.cuda.set_device("cuda:0")`` whenever a
    TrainingArguments is built, and with the launch hidden every MoT process looks single-process: each would
    make a CUDA context on GPU 0 (~0.5 GB each) after it pinned ``cuda:LOCAL_RANK``. Here that call selects the
    pinned GPU instead; :func:`pin_device` then corrects the device the arguments report. A no-op without a
    launcher or GPU.
    """
    device = pinned_device()
    if device is None:
        yield
        return
    set_device = torch.cuda.set_device
    torch.cuda.set_device = lambda _requested: set_device(device)
    try:
        yield
    finally:
        torch.cuda.set_device = set_device


def pin_device(args: TrainingArguments) -> TrainingArguments:
    """Keep ``args`` (and the Trainer built on it) on this process's GPU.

    With the launch hidden, transformers sees one process and picks ``cuda:0`` and every visible GPU
    (DataParallel). Under a launcher each process owns ``cuda:LOCAL_RANK`` alone. A no-op without a launcher or GPU.
    """
    device = pinned_device()
    if device is not None:
        args.__dict__["_setup_devices"] = device  # the cached property behind ``args.device``
        args._n_gpu = 1
        torch.cuda.set_device(device)
    return args


def model_device_map() -> dict[str, int] | None:
    """The ``device_map`` that loads the student whole onto this process's GPU (``None``: the usual default)."""
    device = pinned_device()
    return None if device is None else {"": device.index}


@dataclass
class BranchResult:
    """What a process hands to the merge for one branch: its adapter (the tensors) and its metrics line."""

    adapter: AdapterWeights
    record: dict[str, Any]


class MoTProcessGroup:
    """The processes of one MoT run: which branches this one trains, and the gathers of the merge.

    With one process every method is a plain local operation, so the trainer runs one code path.
    """

    def __init__(self, rank: int = 0, world_size: int = 1, backend: dist.ProcessGroupGloo | None = None):
        self.rank, self.world_size, self._backend = rank, world_size, backend

    @classmethod
    def from_launcher(cls, env: LauncherEnv, timeout: timedelta) -> MoTProcessGroup:
        """A private gloo group on the launcher's store, invisible to ``torch.distributed``'s default group."""
        url = f"tcp://{env.master_addr}:{env.master_port}?rank={env.rank}&world_size={env.world_size}"
        store, _, _ = next(dist.rendezvous(url, timeout=timeout))
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        store = dist.PrefixStore(f"merge_of_thought/{attempt}", store)
        backend = dist.ProcessGroupGloo(store, env.rank, env.world_size, timeout)
        group = cls(env.rank, env.world_size, backend)
        atexit.register(group.close)
        return group

    def close(self) -> None:
        """Shut the private gloo group down, its threads joined, before the interpreter tears its objects down: left
        to the exit, a loaded machine saw a process abort there ("terminate called without an active exception",
        exit code -6, which torchrun reports as a failed run). Registered with atexit; only the exit calls it."""
        backend, self._backend = self._backend, None
        if backend is not None:
            backend.shutdown()

    @property
    def is_main(self) -> bool:
        """Process 0 writes the run folder, the metrics and the exports."""
        return self.rank == 0

    def my_branches(self, count: int) -> list[int]:
        """The branch indices (teacher order) this process trains each round: k with ``k % world_size == rank``."""
        return list(range(self.rank, count, self.world_size))

    def gather_branches(self, mine: Mapping[int, BranchResult | None]) -> dict[int, BranchResult | None]:
        """Every process's branches of this round (index -> result, None for a dropped branch), on every process.

        Two gathers: the small part (configs, scalings, metrics, tensor shapes) pickled, then all factors of a
        process flattened into one fp32 buffer.
        """
        if self.world_size == 1:
            return dict(mine)
        local = sorted(mine.items())
        layouts = self.all_gather_object(
            [(k, None) if b is None else (k, (b.adapter.config, b.adapter.scaling, b.record, _shapes(b.adapter.state)))
             for k, b in local]
        )  # fmt: skip
        flat = [t.reshape(-1) for _, b in local if b is not None for t in b.adapter.state.values()]
        buffers = self._all_gather_buffer(torch.cat(flat) if flat else torch.zeros(0))
        gathered: dict[int, BranchResult | None] = {}
        for layout, buffer in zip(layouts, buffers):
            offset = 0
            for k, parts in layout:
                if parts is None:
                    gathered[k] = None
                    continue
                config, scaling, record, shapes = parts
                state = {}
                for key, shape in shapes:
                    state[key] = buffer[offset : offset + shape.numel()].view(shape).clone()
                    offset += shape.numel()
                gathered[k] = BranchResult(AdapterWeights(state, config, scaling), record)
        return dict(sorted(gathered.items()))

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every process's ``obj`` (picklable), in rank order."""
        if self.world_size == 1:
            return [obj]
        payload = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
        return [pickle.loads(buffer.numpy().tobytes()) for buffer in self._all_gather_buffer(payload)]

    def broadcast_object(self, obj: T | None, src: int = 0) -> T:
        """Process ``src``'s ``obj`` on every process (e.g. the round a resumed run starts from)."""
        if self.world_size == 1:
            return obj
        payload = pickle.dumps(obj) if self.rank == src else b""
        size = torch.tensor([len(payload)], dtype=torch.int64)
        self._backend.broadcast(size, src).wait()
        buffer = torch.frombuffer(bytearray(payload), dtype=torch.uint8) if self.rank == src else None
        buffer = buffer if buffer is not None else torch.empty(int(size), dtype=torch.uint8)
        self._backend.broadcast(buffer, src).wait()
        return pickle.loads(buffer.numpy().tobytes())

    def on_main(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on process 0 only and hand its result to every process (e.g. the per-round evaluation)."""
        return self.broadcast_object(fn() if self.is_main else None)

    def barrier(self) -> None:
        if self.world_size > 1:
            self._backend.barrier().wait()

    # What TRL scripts call on ``trainer.accelerator``: print once, ask who is main, wait for the others.
    @property
    def is_main_process(self) -> bool:
        return self.is_main

    def print(self, *args: Any, **kwargs: Any) -> None:
        if self.is_main:
            print(*args, **kwargs)

    def wait_for_everyone(self) -> None:
        self.barrier()

    def _all_gather_buffer(self, buffer: torch.Tensor) -> list[torch.Tensor]:
        """All-gather 1-D CPU tensors of one dtype and any lengths: lengths first, then the buffers padded."""
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world_size)]
        self._backend.allgather([sizes], [torch.tensor([buffer.numel()], dtype=torch.int64)]).wait()
        longest = max(int(s) for s in sizes)
        padded = torch.cat([buffer, buffer.new_zeros(longest - buffer.numel())])
        out = [buffer.new_empty(longest) for _ in range(self.world_size)]
        self._backend.allgather([out], [padded]).wait()
        return [o[: int(s)] for o, s in zip(out, sizes)]


# MoT's collectives wait for whole branches (the others' gather) and for process 0's round evaluation (everyone's
# broadcast): one 8B branch on a GPU, or a round's generation eval, takes longer than ddp_timeout's 1800 s, which is
# sized for one step's all-reduce. If a process dies, torchrun ends the others, so this only bounds a real hang.
MIN_GROUP_TIMEOUT = timedelta(hours=24)


def group_timeout(ddp_timeout_seconds: float) -> timedelta:
    """The private group's timeout: ``ddp_timeout``, but at least :data:`MIN_GROUP_TIMEOUT`."""
    return max(timedelta(seconds=ddp_timeout_seconds), MIN_GROUP_TIMEOUT)


def process_group(ddp_timeout_seconds: float = 1800) -> MoTProcessGroup:
    """This process's :class:`MoTProcessGroup`: created once (the launcher's store admits one rendezvous)."""
    global _group
    if _group is None:
        env = detach_from_launcher()
        timeout = group_timeout(ddp_timeout_seconds)
        _group = MoTProcessGroup() if env is None else MoTProcessGroup.from_launcher(env, timeout)
    return _group


def _shapes(state: Mapping[str, torch.Tensor]) -> list[tuple[str, torch.Size]]:
    return [(key, tensor.shape) for key, tensor in state.items()]
