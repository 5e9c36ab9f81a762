r"""CPU concurrency: work side by side on one-thread workers.

A capture chunk's small convolutions, poolings and copies keep two intra-op threads busy poorly, and a matrix
product on one thread runs closer to a core's peak than one split between two. So on CPU the structured engine runs
whole pieces of work side by side, each worker thread with its share of torch's threads (one on a 2-core CPU):

- capture chunks, each on its own *replica* of the model (:class:`Replicas`);
- the strips of the Gram matrix of wide factors, cut by rows (:func:`strips`).

On the 2-core AMD EPYC of ``docs/benchmarks.md`` (the paper's VGG on MNIST-shaped images, ``empirical_ntk``
symmetric, n = 1,000 / 2,000, interleaved, median of 5, 2026-12-08), switching one of them off took 1.10x / 1.16x
the time (serial capture) and 1.03x / 1.11x (serial strips); the paper's MLP is within noise either way. Two more
mechanisms were measured there and removed for paying less than 10%: convolutions' input gradients by NNPACK on
the one-thread workers (1.05x / 1.06x) and capture chunks sized to the cache (1.06x / 0.99x).

One option, the environment variable :data:`WORKERS_VARIABLE`: unset, automatic (capture workers for models that
:func:`concurrency_obstacle` clears, strips side by side for wide factors); ``1``, everything in the calling thread
on all of torch's threads; N, N workers for any model (the user's word that its forward may run on replicas side
by side). Torch's intra-op thread count is set per thread and becomes the default of threads started later, so one
engine at a time works side by side (:data:`_CONCURRENT`; another engine meanwhile works in its own thread), and
the caller's count is set again afterwards.
"""

from __future__ import annotations

import copy
import os
import queue
import threading
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import replace
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import _get_current_dispatch_mode as _current_dispatch_mode

from lightning_afterkernel.errors import ConfigurationError
from lightning_afterkernel.kernels._model import autograd_enabled

if TYPE_CHECKING:
    from lightning_afterkernel.kernels._structured import Factors, Layer

    Model = tuple[nn.Module, list[Layer]]

WORKERS_VARIABLE = "AFTERKERNEL_CPU_WORKERS"
"""Environment variable: how many workers run side by side on CPU, each with ``torch.get_num_threads() // workers``
intra-op threads. Unset: automatic; ``1``: none (everything in the calling thread, on all of torch's threads)."""
DEPRECATED_VARIABLE = "AFTERKERNEL_CAPTURE_WORKERS"
"""The variable's former name (it counted capture workers only): read, with a ``DeprecationWarning``, when
:data:`WORKERS_VARIABLE` is unset."""
MAX_AUTO_WORKERS = 8
"""Most capture workers chosen without the variable: one per torch thread up to this (measured on 2 cores only)."""
GRAM_WORKERS = 2
"""Strips' parts computed side by side without the variable (each with ``torch.get_num_threads() // 2`` intra-op
threads): a strip cut in two keeps two workers busy however few the strips."""
CONCURRENT_GRAM_WIDTH = 8192
"""Materialised factors at least this wide (the paper's VGG: 91,542 columns; its MLP, whose layers are structured:
95) have their strips cut by rows and computed side by side: a 1,000 x 95,267 factor matrix's upper triangle took
0.64 s that way against 0.76 s in 256-row strips on both threads (2 cores, median of 7, interleaved), and the
diagonal blocks' unneeded triangles shrink. Narrow factors (many small products per strip) were slower."""
_CONCURRENT = threading.Lock()
"""Held while an engine works side by side (see the module docstring)."""


def asked_workers() -> int | None:
    """The worker count set by :data:`WORKERS_VARIABLE` (or :data:`DEPRECATED_VARIABLE`), None when unset."""
    name, value = WORKERS_VARIABLE, os.environ.get(WORKERS_VARIABLE, "").strip()
    if not value and os.environ.get(DEPRECATED_VARIABLE, "").strip():
        name, value = DEPRECATED_VARIABLE, os.environ[DEPRECATED_VARIABLE].strip()
        warnings.warn(
            f"{DEPRECATED_VARIABLE} is deprecated; set {WORKERS_VARIABLE} instead (the same count, which also "
            "governs the Gram matrix's strips).",
            DeprecationWarning,
            stacklevel=2,
        )
    if not value:
        return None
    if value.isdigit() and int(value) >= 1:
        return int(value)
    raise ConfigurationError(
        f"{name}={value!r} must be a positive number of workers (1: everything in the calling thread, on all of "
        f"torch's threads), or unset (automatic)."
    )


def capture_workers(obstacle: str | None) -> int:
    """Capture workers on CPU: the variable's count if set, else one per torch thread up to
    :data:`MAX_AUTO_WORKERS` when there is no ``obstacle`` (:func:`concurrency_obstacle`), else 1."""
    asked = asked_workers()
    if asked is not None:
        return asked
    threads = min(MAX_AUTO_WORKERS, torch.get_num_threads())
    return 1 if threads < 2 or obstacle is not None else threads


def plain_thread_state(x: Tensor) -> bool:
    """No autocast, torch-function or dispatch mode, or saved-tensor hooks in this thread: worker threads start
    without them, so work under any of them stays in this thread (and computes what the caller asked)."""
    try:
        return not (
            torch.is_autocast_enabled(x.device.type)
            or torch._C._is_torch_function_mode_enabled()
            or _current_dispatch_mode() is not None
            or torch._C._autograd._top_saved_tensors_default_hooks(False) is not None
        )
    except (AttributeError, TypeError, RuntimeError):  # another torch: no concurrency rather than a guess
        return False


@contextmanager
def _pool(count: int, name: str) -> Iterator[tuple[ThreadPoolExecutor, int]]:
    """A pool of ``count`` threads and the intra-op thread count each should set, its share of torch's. On exit
    (once every thread has stopped) the caller's count is set again: ``torch.set_num_threads`` sets the calling
    thread's count and the default of threads started later, and the workers' must not become that default."""
    threads = torch.get_num_threads()
    try:
        with ThreadPoolExecutor(count, thread_name_prefix=name) as pool:
            yield pool, max(1, threads // count)
    finally:
        torch.set_num_threads(threads)


# ------------------------------------------------------------------ the capture
class Replicas:
    """The model and up to ``workers - 1`` replicas of it (:func:`replicate`), made when first needed, each checked
    first to capture bitwise what the model does: ``probe(model, layers)`` gives the tensors of a capture of a few
    examples. A replica that does not (its forward escapes it), or raises, leaves the capture serial for good."""

    def __init__(
        self, model: nn.Module, layers: list[Layer], workers: int, probe: Callable[[nn.Module, list[Layer]], list]
    ) -> None:
        self.workers = workers
        self._probe = probe
        self._ready: list[Model] = [(model, layers)]

    def capture(self, x: Tensor, chunks: list[slice], work: Callable[[nn.Module, list[Layer], slice], None]) -> None:
        """``work(model, layers, rows)`` for each chunk of ``x``: side by side on replicas when there are several
        chunks and workers, the thread state is plain and no other engine works side by side; else one after
        another on the model in this thread. The first error is raised once every worker has stopped, and a
        failure skips the chunks not yet started."""
        replicas = self._take(min(self.workers, len(chunks))) if plain_thread_state(x) else self._ready[:1]
        if len(replicas) < 2 or not _CONCURRENT.acquire(blocking=False):
            for rows in chunks:
                work(*self._ready[0], rows)
            return
        try:
            _side_by_side(replicas, chunks, work)
        finally:
            _CONCURRENT.release()

    def _take(self, count: int) -> list[Model]:
        expected = None  # the model's own probe capture, taken once for every replica checked now
        while len(self._ready) < count:
            model, layers = self._ready[0]
            try:
                expected = self._probe(model, layers) if expected is None else expected
                replica = replicate(model, layers)
                agrees = all(torch.equal(a, b) for a, b in zip(expected, self._probe(*replica), strict=True))
            except Exception:  # e.g. a forward that looks its module up in a registry: the serial path works
                agrees = False
            if not agrees:
                self.workers = 1
                break
            self._ready.append(replica)
        return self._ready[: max(1, min(count, self.workers))]


def _side_by_side(
    replicas: list[Model], chunks: list[slice], work: Callable[[nn.Module, list[Layer], slice], None]
) -> None:
    """Each chunk captured by whichever of the threads is free, on its own replica, with its share of torch's
    threads."""
    free: queue.SimpleQueue = queue.SimpleQueue()
    for replica in replicas:
        free.put(replica)
    failed = threading.Event()

    def run(rows: slice) -> None:
        if failed.is_set():
            return
        model, layers = free.get()
        try:
            torch.set_num_threads(per_worker)
            with autograd_enabled():
                work(model, layers, rows)
        except BaseException:
            failed.set()
            raise
        finally:
            free.put((model, layers))

    with _pool(len(replicas), "afterkernel-capture") as (pool, per_worker):
        try:
            for future in [pool.submit(run, rows) for rows in chunks]:
                future.result()
        except BaseException:  # e.g. KeyboardInterrupt here: the chunks not yet started are skipped
            failed.set()
            raise


STATELESS_FORWARD = "afterkernel_stateless_forward"
"""A class that sets this attribute to True in its own body (a subclass does not inherit the promise) declares
that its forward keeps no state outside its own attributes between calls and reaches its submodules only through
them, so that chunks may be captured side by side on replicas of it (see :func:`concurrency_obstacle`)."""
_HOOK_TABLES = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_pre_hooks_with_kwargs",
)


@contextmanager
def recording_calls(model: nn.Module) -> Iterator[list[int]]:
    """Within the block, the ``id`` of every module of ``model`` that is called is appended to the list yielded.
    (Ids, and a hook that ``torch.compile`` does not trace: a compiled model's tracer fails on hooks that keep
    module objects.)"""
    called: list[int] = []

    @torch.compiler.disable
    def record(module: nn.Module, args: tuple) -> None:
        called.append(id(module))

    handles = [module.register_forward_pre_hook(record) for module in model.modules()]
    try:
        yield called
    finally:
        for handle in handles:
            handle.remove()


def concurrency_obstacle(model: nn.Module, called: list[int]) -> str | None:
    """Why chunks of ``model`` may not be captured side by side without the user's word for it, or None.

    A forward may keep state where a replica shares it with the original (a list of activations, a hook that
    is a bound method of the model, a closure), and then two threads read each other's values: no check on
    finished results can rule that out. So concurrency is automatic only when every module ``called`` in a
    forward (see :func:`recording_calls`) is a class of ``torch.nn`` itself or declares :data:`STATELESS_FORWARD`,
    and none has hooks of the user's; their forwards reach only their own submodules, so the modules called
    do not depend on the data."""
    modules = {id(module): (name, module) for name, module in model.named_modules(remove_duplicate=False)}
    for key in dict.fromkeys(called):
        name, module = modules[key]
        cls, name = type(module), name or "<root>"
        built_in = cls.__module__.startswith("torch.nn.") and not cls.__module__.startswith("torch.nn.parallel")
        if not (built_in or cls.__dict__.get(STATELESS_FORWARD) is True):  # (DataParallel/DDP forwards keep state)
            return f"module {name} ({cls.__name__}) has a forward of its own"
        if any(getattr(module, table, None) for table in _HOOK_TABLES):
            return f"module {name} ({cls.__name__}) has hooks"
    return None


def replicate(model: nn.Module, layers: list[Layer]) -> Model:
    """A replica of ``model`` for a concurrent capture, and ``layers`` mapped onto it.

    Every module of the tree is a new object of the same class whose attribute dictionary is a copy of the
    original's, and whose ``_parameters``, ``_buffers``, ``_modules`` and hook tables (every dict attribute) are
    copies too: the capture can then register hooks on it and ``functional_call`` swap its tensors while another
    thread does the same on the original. Parameters, buffers and every other attribute value are shared, not
    copied (no tensor memory). A module reached twice (a shared submodule) is one replica. A forward that reaches
    the original's modules some other way (e.g. through a plain list) would escape the replica: :class:`Replicas`
    checks each one."""
    replicas: dict[int, nn.Module] = {}

    def copy_module(module: nn.Module) -> nn.Module:
        if id(module) in replicas:
            return replicas[id(module)]
        clone = object.__new__(type(module))
        replicas[id(module)] = clone
        state = {key: copy.copy(value) if isinstance(value, dict) else value for key, value in vars(module).items()}
        state["_modules"] = {
            name: None if child is None else copy_module(child) for name, child in module._modules.items()
        }
        clone.__dict__.update(state)
        return clone

    replica = copy_module(model)
    modules = dict(replica.named_modules(remove_duplicate=False))
    return replica, [replace(layer, module=modules[layer.name]) for layer in layers]


# ------------------------------------------------------------------ the Gram matrix's strips
def strip_workers(factors: Factors) -> int:
    """Workers for the strips of a block of ``factors``: on CPU, for materialised factors at least
    :data:`CONCURRENT_GRAM_WIDTH` wide whose structured layers (if any) have one position (larger ones take up to
    ``_gram.TILE_TEMP_BYTES`` of temporaries per strip: one at a time), in a plain thread state, the variable's count
    or :data:`GRAM_WORKERS` up to torch's thread count; else 1."""
    jac = factors.jac
    if jac is None or jac.device.type != "cpu" or jac.shape[1] < CONCURRENT_GRAM_WIDTH:
        return 1
    if not all(left.shape[1] == 1 for left, _ in factors.pairs) or not plain_thread_state(jac):
        return 1
    asked = asked_workers()
    return min(GRAM_WORKERS, torch.get_num_threads()) if asked is None else asked


def strips(
    jobs: list[tuple[slice, slice]], run: Callable[[slice, slice], None], factors: Factors, upper: bool = False
) -> Iterator[None]:
    """``run(rows, cols)`` for each job (each writes its own entries of the result), yielding once per job done, in
    order. With :func:`strip_workers` > 1 and no other engine working side by side, each job is cut by rows into a
    part per worker and the parts are computed side by side; with ``upper`` (strips of the upper triangle), each
    part of a strip that starts on the diagonal starts on it too. A failure (or the caller closing the generator)
    cancels the parts not yet started."""
    workers = strip_workers(factors)
    if workers < 2 or not _CONCURRENT.acquire(blocking=False):
        for rows, cols in jobs:
            run(rows, cols)
            yield
        return
    try:
        with _pool(workers, "afterkernel-gram") as (pool, per_worker):

            def work(rows: slice, cols: slice) -> None:
                torch.set_num_threads(per_worker)
                run(rows, cols)

            parts = [[pool.submit(work, *part) for part in _row_parts(*job, workers, upper)] for job in jobs]
            try:
                for futures in parts:
                    for future in futures:
                        future.result()
                    yield
            except BaseException:
                for futures in parts:
                    for future in futures:
                        future.cancel()
                raise
    finally:
        _CONCURRENT.release()


def _row_parts(rows: slice, cols: slice, count: int, upper: bool) -> list[tuple[slice, slice]]:
    """The strip K(rows, cols) cut into up to ``count`` parts of near-equal height."""
    height = rows.stop - rows.start
    count = min(count, height)
    parts = []
    for k in range(count):
        part = slice(rows.start + height * k // count, rows.start + height * (k + 1) // count)
        on_diagonal = upper and cols.start == rows.start and k > 0
        parts.append((part, slice(part.start, cols.stop) if on_diagonal else cols))
    return parts
