"""Data-parallel training on HF accelerate. ``torchrun --nproc_per_node N -m effkern <method> ...`` or ``accelerate
launch --multi_gpu --num_processes N -m effkern <method> ...`` (on GPUs and on the CPU alike; accelerate's own
``--cpu`` starts one process unless given an MPI hostfile) runs every process through the same flow: each training
step's batch is split across the processes and DDP averages their gradients (gloo on the CPU, NCCL on GPUs), so N
processes take the steps one would on the same global batch (exactly when the batch splits evenly; a final partial
batch weighs its shards equally). Everything else (data, evaluation, early-stopping decisions) runs identically in
every process, and only the main process writes files. Without a launcher it is one process, as before.
"""

from __future__ import annotations

import functools

import torch


@functools.cache
def accelerator():
    """The process's ``accelerate.Accelerator`` (one per process: accelerate's state is process-wide). Without a GPU
    it is told so (``cpu=True``): only then does it join processes started by ``torchrun`` / ``accelerate launch
    --multi_gpu`` as gloo data-parallel CPU workers instead of each running alone."""
    from accelerate import Accelerator

    return Accelerator(cpu=not torch.cuda.is_available())


def is_main() -> bool:
    """Whether this process writes files (always, without ``accelerate launch``)."""
    return accelerator().is_main_process


def barrier() -> None:
    """Wait until every process gets here (a no-op in one process)."""
    accelerator().wait_for_everyone()


def from_main(value):
    """The main process's ``value`` in every process (``value`` of the others is ignored): work done once, e.g. a
    measurement that processes running side by side would disturb."""
    acc = accelerator()
    if acc.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    box = [value if acc.is_main_process else None]
    broadcast_object_list(box)
    return box[0]


def local_batch(idx: torch.Tensor) -> torch.Tensor | None:
    """This process's share of a global batch of example indices; None for a batch too small to give every process
    one example (every process skips it alike)."""
    acc = accelerator()
    if idx.numel() < acc.num_processes:
        return None
    return idx.tensor_split(acc.num_processes)[acc.process_index]


def prepare(model: torch.nn.Module, optimizer: torch.optim.Optimizer, place: bool = True):
    """(model, optimizer) placed on this process's device (unless ``place`` is False: the model is part of a larger
    one that stays where it is) and wrapped for gradient sync (DDP) when there are several processes; the caller's
    ``model`` object is trained in place either way."""
    return accelerator().prepare(model, optimizer, device_placement=[place, place])


def backward(loss: torch.Tensor) -> None:
    accelerator().backward(loss)


def release() -> None:
    """Drop accelerate's references to the models and optimizers prepared so far (a flow trains many)."""
    accelerator().free_memory()


def main_only(write):
    """``write`` runs in the main process only (file writers: one copy of every file)."""

    @functools.wraps(write)
    def call(*args, **kwargs):
        if is_main():
            return write(*args, **kwargs)
        return None

    return call
