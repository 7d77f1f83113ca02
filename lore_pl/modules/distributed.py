"""Process groups that end while Python is still alive.

Lightning destroys the process group at exit only for NCCL. A gloo group (CPU DDP, ``ddp_spawn``)
is left to the interpreter's finalization, where gloo's worker threads may still hold work whose
tensors reference Python objects; releasing those then needs a GIL that is being torn down, and the
process aborts (``terminate called without an active exception``, SIGABRT) after the run finished.
So every module that can run under DDP registers, once per process, an exit handler that destroys
the group first.
"""

from __future__ import annotations

import atexit

import torch.distributed as dist

_registered = False


def destroy_process_group_if_initialized() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def release_process_group_at_exit() -> None:
    """Register (once) the exit handler that destroys a live gloo process group before finalization."""
    global _registered
    if _registered or not (dist.is_available() and dist.is_initialized()):
        return
    if dist.get_backend() == "gloo":  # NCCL: Lightning registers the same handler itself
        atexit.register(destroy_process_group_if_initialized)
        _registered = True
