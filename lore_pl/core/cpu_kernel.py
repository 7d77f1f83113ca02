"""The fused CPU step: ``csrc/user_pass.c``, compiled on first use and called through ctypes.

Why C: a full-batch basis step is bound by reading the features, yet PyTorch's products with K=5
columns run at a fraction of the memory bandwidth on a CPU (``X @ V`` and ``G^T X`` measured at
5-8 GB/s against 20-30 GB/s for a plain read) and read X twice. The kernel reads each row once
(see the C file). It needs a C compiler (``$CC``, else ``cc``); without one, or with
``LORE_PL_CPU_KERNEL=0``, ``available()`` is False and ``lore_pl.core.functional.pair_loss`` takes the
PyTorch path, which gives the same numbers to float32 rounding.

The shared library is cached under ``$LORE_PL_CACHE_DIR`` (default ``~/.cache/lore_pl``), keyed by
the source, the compiler, its flags and this CPU (``-march=native``), and written atomically.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import tempfile
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import Tensor

SOURCE = Path(__file__).with_name("csrc") / "user_pass.c"
FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fPIC", "-shared")
OPENMP = ("-fopenmp",)  # tried first; without it the ranges run on a Python thread pool
_POINTER, _INT = ctypes.c_void_p, ctypes.c_int64

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_tried = False
_pool: tuple[int, int, ThreadPoolExecutor] | None = None  # (pid, workers, pool)


def cache_dir() -> Path:
    """Where compiled kernels are kept (``$LORE_PL_CACHE_DIR``, else ``~/.cache/lore_pl``)."""
    root = os.environ.get("LORE_PL_CACHE_DIR")
    return Path(root) if root else Path.home() / ".cache" / "lore_pl"


def _cpu_identity() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return ""
    return "\n".join(sorted({line for line in lines if line.startswith(("model name", "flags"))}))


def _compile(compiler: str, extra: tuple[str, ...] = OPENMP) -> Path:
    flags = (*FLAGS, *extra)
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), compiler, version, *flags, _cpu_identity()]).encode())
    target = cache_dir() / f"user_pass-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # compile next to the target, then rename: a concurrent process never loads a half-written file
    handle, partial = tempfile.mkstemp(dir=target.parent, prefix=target.name, suffix=".partial")
    os.close(handle)
    try:
        subprocess.run([compiler, *flags, str(SOURCE), "-o", partial, "-lm"], check=True, capture_output=True,
                       text=True, timeout=300)
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return target


def _build(compiler: str) -> ctypes.CDLL:
    try:
        return ctypes.CDLL(str(_compile(compiler)))
    except (OSError, subprocess.SubprocessError):
        return ctypes.CDLL(str(_compile(compiler, extra=())))  # a compiler without OpenMP


def _load() -> ctypes.CDLL | None:
    global _library, _tried
    with _lock:
        if _tried:
            return _library
        _tried = True
        compiler = os.environ.get("CC", "cc")
        try:
            library = _build(compiler)
        except (OSError, subprocess.SubprocessError) as error:
            detail = getattr(error, "stderr", "") or str(error)
            warnings.warn(f"lore_pl: could not build the fused CPU kernel with {compiler!r} ({detail.strip()[-300:]}); "
                          "using the PyTorch path (same results, slower)", RuntimeWarning, stacklevel=3)
            return None
        function = library.lore_user_pass
        function.restype = ctypes.c_double
        function.argtypes = [_POINTER, ctypes.c_int, _INT, _POINTER, _POINTER, _INT, _INT, _POINTER, _INT, _POINTER,
                             _POINTER, _POINTER, _POINTER, _POINTER, ctypes.c_int, _POINTER]
        library.lore_user_pass_ranges.restype = None
        library.lore_user_pass_ranges.argtypes = [_POINTER, ctypes.c_int, _INT, _POINTER, _POINTER, _POINTER, _INT,
                                                  _POINTER, _INT, _POINTER, _POINTER, _POINTER, _POINTER, _POINTER,
                                                  ctypes.c_int, _POINTER, _POINTER]
        _library = library
        return library


def enabled() -> bool:
    """False when ``LORE_PL_CPU_KERNEL=0`` turns the kernel off."""
    return os.environ.get("LORE_PL_CPU_KERNEL", "1") != "0"


def available() -> bool:
    """The kernel is enabled and compiled (compiling it on the first call)."""
    return enabled() and _load() is not None


def applies(features: Tensor, basis: Tensor) -> bool:
    """The kernel can take this step: float32 or bfloat16 contiguous features on the CPU, a float32
    basis, and the kernel is available."""
    return (features.device.type == "cpu" and basis.device.type == "cpu"
            and features.dtype in (torch.float32, torch.bfloat16)
            and basis.dtype == torch.float32 and features.dim() == 2 and features.is_contiguous()
            and not features.requires_grad and available())


def _executor(workers: int) -> ThreadPoolExecutor:
    global _pool
    with _lock:
        # a forked child inherits the pool object but not its threads: make a new one there
        if _pool is None or _pool[0] != os.getpid() or _pool[1] != workers:
            _pool = (os.getpid(), workers, ThreadPoolExecutor(workers, thread_name_prefix="lore_pl_kernel"))
        return _pool[2]


def user_pass(features: Tensor, users: Tensor, basis: Tensor, coefficients: Tensor, row_weights: Tensor,
              with_basis_grad: bool = True) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Loss ``sum_i c_i softplus(-x_i . V a_{u_i})``, the logits, and the gradients in ``a`` and ``V``.

    ``coefficients`` are ``a`` ``[C, K]`` (the users' weights over tau); ``row_weights`` are ``c``
    ``[N]``. Features may be float32 or bfloat16 (widened on load; the arithmetic is float32).
    Returns ``(loss, logits [N], grad_coefficients [C, K], grad_basis [d, K] or None)``.
    Runs on ``torch.get_num_threads()`` threads, each on a contiguous range of users.
    """
    library = _load()
    if library is None:
        raise RuntimeError("the fused CPU kernel is not available (see lore_pl.core.cpu_kernel.available)")
    num_rows, dim = features.shape
    num_users, rank = coefficients.shape
    users = users.to(torch.long)
    sorted_by_user = num_rows < 2 or bool((users[1:] >= users[:-1]).all())
    order = None if sorted_by_user else torch.argsort(users, stable=True)
    starts = torch.zeros(num_users + 1, dtype=torch.long)
    torch.cumsum(torch.bincount(users, minlength=num_users), 0, out=starts[1:])
    basis_t = basis.detach().t().contiguous()
    coefficients = coefficients.detach().float().contiguous()
    row_weights = row_weights.detach().float().contiguous()
    logits = torch.empty(num_rows)
    grad_coefficients = torch.zeros(num_users, rank)
    workers = max(1, min(torch.get_num_threads(), num_users))
    # contiguous ranges of users with about the same number of rows each
    cuts = torch.searchsorted(starts, torch.linspace(0, num_rows, workers + 1)[1:-1].round().long()).tolist()
    bounds = list(zip([0, *cuts], [*cuts, num_users]))
    grad_basis_t = torch.zeros(workers, rank, dim)
    work = torch.empty(workers, 2 * dim)
    # the arguments both entry points share, before and after the users' range(s)
    inputs = (features.data_ptr(), int(features.dtype == torch.bfloat16), dim,
              None if order is None else order.data_ptr(), starts.data_ptr())
    outputs = (basis_t.data_ptr(), rank, coefficients.data_ptr(), row_weights.data_ptr(), logits.data_ptr(),
               grad_coefficients.data_ptr())

    def run(worker: int) -> float:
        first, last = bounds[worker]
        return library.lore_user_pass(*inputs, first, last, *outputs, grad_basis_t[worker].data_ptr(),
                                      int(with_basis_grad), work[worker].data_ptr())

    if workers == 1:
        loss = run(0)
    elif library.lore_has_openmp():  # on PyTorch's own OpenMP threads
        edges = torch.tensor([0, *cuts, num_users], dtype=torch.long)
        losses = torch.zeros(workers, dtype=torch.float64)
        library.lore_user_pass_ranges(*inputs, edges.data_ptr(), workers, *outputs, grad_basis_t.data_ptr(),
                                      int(with_basis_grad), work.data_ptr(), losses.data_ptr())
        loss = float(losses.sum())
    else:  # ctypes releases the GIL during the call, so the workers run in parallel
        loss = sum(_executor(workers).map(run, range(workers)))
    grad_basis = grad_basis_t.sum(0).t().contiguous() if with_basis_grad else None
    return torch.tensor(loss), logits, grad_coefficients, grad_basis
