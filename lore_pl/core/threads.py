"""One thread policy for the loops of small ops: model selection, the L-BFGS stages, the few-shot fit.

Each step of these loops is a few dozen operations on small tensors, each a few microseconds; waking a
second OpenMP thread for each costs more than it saves, and on a busy machine far more (issue 22: model
selection with 2 threads was 1.2x faster than with 1 when the machine was quiet and 5-19x slower when it
was busy; the few-shot fit 3.7x slower). Above ``SMALL_OPS`` elements per operation the arithmetic
dominates and the threads earn their keep (``benchmarks/selection.py --threads`` measures the crossing).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

#: the largest operand (elements) of a loop under which it runs on one CPU thread
SMALL_OPS = 1 << 21


def small_ops(elements: int, device: torch.device | str = "cpu") -> bool:
    """Whether a loop whose largest operand has ``elements`` elements runs on one thread."""
    return torch.device(device).type == "cpu" and elements < SMALL_OPS


@contextmanager
def threads_for(elements: int, device: torch.device | str = "cpu") -> Iterator[int]:
    """Run the block on one CPU thread where its largest operand is small (``small_ops``), else on as
    many as PyTorch has; the thread count is restored afterwards, whatever happens. Yields the count."""
    threads = torch.get_num_threads()
    if not small_ops(elements, device) or threads == 1:
        yield threads
        return
    torch.set_num_threads(1)
    try:
        yield 1
    finally:
        torch.set_num_threads(threads)
