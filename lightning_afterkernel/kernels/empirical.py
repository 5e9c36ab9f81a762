"""Empirical NTK of a scalar-output model: the production engine."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn
from torch.func import grad, jacrev, vmap

from lightning_afterkernel.errors import ConfigurationError, KernelError, ModelError
from lightning_afterkernel.kernels import _cpu
from lightning_afterkernel.kernels import _structured as st
from lightning_afterkernel.kernels._audit import audit_capture, probe_capture
from lightning_afterkernel.kernels._gram import default_budget, gram, parse_memory_budget
from lightning_afterkernel.kernels._gram import paired as paired_rows
from lightning_afterkernel.kernels._model import (
    Outputs,
    State,
    autograd_enabled,
    check_model,
    check_options,
    eval_mode,
    example_logits,
    mirror_upper,
    prepare,
    resolve_outputs,
    scalar_logit,
    swap,
)
from lightning_afterkernel.kernels._settings import eager, tf32

Implementation = Literal["auto", "structured", "materialised", "vmap"]
OutputMode = Literal["trace", "full"] | int
IMPLEMENTATIONS = ("auto", "structured", "materialised", "vmap")
TILE = 256
"""Rows of one strip of the kernel (the unit of work and of the progress count)."""
CAPTURE_SHARE = 0.25
"""Share of the memory budget for one capture chunk (activations, patches, per-example gradients)."""
RESIDENT_SHARE = 0.35
"""Share of the memory budget for each of the two sets of factors held at once (row panel, column group)."""
MAX_CHUNK = 4096
OOM_RETRIES = 4
"""Out-of-memory retries, each with half the memory budget, strip height and batch size."""
Progress = Callable[[int, int], None]


def empirical_ntk(
    model: nn.Module,
    x1: Tensor,
    x2: Tensor | None = None,
    *,
    outputs: OutputMode = "trace",
    implementation: Implementation = "auto",
    paired: bool = False,
    batch_size: int | None = None,
    memory_budget: int | float | str | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    progress: bool | Progress = False,
    allow_tf32: bool = False,
    shard: tuple[int, int] | None = None,
) -> Tensor:
    r"""Empirical NTK :math:`K(x, x') = \langle \partial f(x)/\partial\theta, \partial f(x')/\partial\theta
    \rangle` over the parameters :math:`\theta` with ``requires_grad=True``.

    Implementations (n1 x n2 kernel, P parameters; for a layer, T output positions, d inputs per
    position (fan-in, +1 for a bias), p outputs per position):

    - ``"structured"``: one batched forward and backward of :math:`\sum_i f(x_i)` per chunk, with hooks
      recording each layer's input :math:`A` and output gradient :math:`G`. Each layer then contributes in
      the cheaper of two forms: *structured*, :math:`K(i, j) = \sum_{t,s} (L_i L_j^\top)_{ts}
      (R_i R_j^\top)_{ts}` with :math:`L` = im2col patches of :math:`A` (plus a ones column for the bias) and
      :math:`R = G` (a Linear layer on vectors: :math:`K = ([A, 1][A, 1]^\top) \odot (G G^\top)`), costing
      :math:`n_1 n_2 T^2 (d + p)`; or *materialised* per-example gradients :math:`G_i^\top L_i`, costing
      :math:`(n_1 + n_2) T d p` to form and :math:`n_1 n_2 d p` in the Gram matrix. Memory: the per-example
      factors of at most two blocks of examples (sized from ``memory_budget``) plus one capture chunk's
      activations. Handles ``Linear``, ``Conv2d`` (stride, padding, dilation, groups, padding modes),
      eval-mode ``BatchNorm`` and every parameter-free layer. On any device but a CPU with oneDNN (CUDA), the
      capture's convolutions run as im2col patches times the weight, rounded entry by entry like a direct
      convolution (tiled algorithms such as cuDNN's Winograd/FFT flip ReLU gates against float64), in parts
      of at most 256 MiB of patches.
    - ``"materialised"``: the same hooks, every layer as per-example gradients (n P floats to hold,
      n1 n2 P multiply-adds).
    - ``"vmap"``: ``torch.func.vmap(grad(f))`` per example, for any model (n P floats, n1 n2 P
      multiply-adds, and per-example forward/backward passes: the slowest).
    - ``"auto"`` (default): ``"structured"`` when the model allows it, else ``"vmap"`` with a warning
      (another parametrised module type, a module called twice per forward, shared parameters, or a parameter
      the audit finds used outside its own module's call).

    The structured and materialised implementations are audited before any kernel is computed: on the first
    examples, in float64, the per-example gradients their captured factors imply must sum (with random weights)
    to autograd's gradient for every trainable tensor (``kernels/_audit.py``). A tensor read anywhere the layer
    hooks do not see (a cosine head's normalised weight, tied or transposed weights, weight standardisation, a
    reused bias, a hook reading the weight) or examples that interact within a batch fail it, and the model takes
    ``"vmap"`` with a warning naming the tensor (``"structured"``/``"materialised"`` raise ``ModelError``).

    When ``x2`` is None only tiles on and above the diagonal are computed; the result is exactly symmetric.
    Factors are computed once when they fit in ``memory_budget``; otherwise the rows are processed in
    panels and column blocks are recomputed once per panel, so n = 12,000 and beyond run in bounded memory
    (the result itself, n1 n2 floats, is not counted). The model runs in eval mode on detached copies of its
    tensors; its train/eval flags, parameters and ``.grad`` are left as they were. Works under
    ``torch.no_grad()`` and ``torch.inference_mode()``.

    Args:
        model: module whose forward maps a batch (n, ...) to one logit per example, (n,) or (n, 1).
        x1: inputs (n1, ...).
        x2: inputs (n2, ...) with x1's per-example shape; ``None`` gives the symmetric Gram matrix of ``x1``
            (or, with ``paired``, its diagonal).
        outputs: for a model with k logits ((n, k) outputs): ``"trace"`` (default), :math:`\sum_c \langle
            \nabla f_c(x), \nabla f_c(x') \rangle`; an int c, the NTK of logit c; ``"full"``, the (n1, n2, k, k)
            blocks :math:`\langle \nabla f_a(x), \nabla f_b(x') \rangle`. One backward pass per logit in the
            capture; the trace widens each example's factors k times (a structured Linear layer's kernel is
            :math:`(A A^\top) \odot \sum_c G_c G_c^\top`), ``"full"`` has a factor row per example and logit
            (k^2 the Gram work). With one logit every mode is today's kernel, bit for bit (``"full"``: with two
            trailing dimensions of size 1).
        implementation: see above.
        paired: return the vector :math:`K(x_1[i], x_2[i])` (needs n1 == n2) instead of a matrix, at the cost
            of n1 + n2 per-example gradients (n1 when ``x2`` is None: the diagonal).
        batch_size: examples per forward/backward chunk; ``None`` sizes it from the memory budget.
        memory_budget: working memory in bytes, or a string such as ``"1GiB"``; ``None``: half the free
            GPU memory, or a quarter of the available RAM on CPU.
        dtype: floating dtype of the computation, its accumulation and the result (float32 by default).
        device: where to compute (the model and inputs are copied there); ``None`` uses the model's device.
        progress: ``True`` for a tqdm bar, or a callable ``(tiles_done, tiles_total)`` (e.g. one feeding
            Lightning's progress bar).
        allow_tf32: let CUDA matmuls and convolutions use TF32 (10 mantissa bits; faster, less exact). The
            switches are process-wide while kernels are computed (a call from another thread with the other
            setting waits), and ``torch.compile``d code runs eagerly meanwhile (see ``docs/design.md``).
        shard: ``(rank, world_size)``: compute only this rank's share of the work (blocks of rows of the
            result, cut from n and the world size alone and balanced by cost across ranks) and leave zeros
            elsewhere, so that summing the results of all ranks (one ``torch.distributed.all_reduce``) gives
            the kernel, exactly, whatever each rank's memory budget, batch size or out-of-memory retries.

    Returns:
        The (n1, n2) kernel, or the (n1,) vector when ``paired``, in ``dtype`` on the computation device; for
        ``outputs="full"`` each entry is a (k, k) block: (n1, n2, k, k) and (n1, k, k).
    """
    if paired and x2 is not None and isinstance(x1, Tensor) and isinstance(x2, Tensor) and len(x2) != len(x1):
        raise ConfigurationError(
            f"paired=True pairs x1[i] with x2[i], so x1 and x2 need the same number of examples; got "
            f"{len(x1)} and {len(x2)}."
        )

    def task(engine: _Engine, a: Tensor, b: Tensor | None, report: Progress | None) -> Tensor:
        return engine.run(a, b, paired, report)

    options = dict(
        outputs=outputs, batch_size=batch_size, memory_budget=memory_budget, dtype=dtype, device=device, shard=shard
    )
    n1, n2 = _length(x1), _length(x2)
    if paired:
        workload = (n1, n1 + n2)
    else:
        workload = (n1 * n1 / 2, n1) if x2 is None else (n1 * n2, n1 + n2)
    return _compute(model, x1, x2, workload, task, implementation, progress, allow_tf32, **options)


def empirical_ntk_train_test(
    model: nn.Module,
    x_train: Tensor,
    x_test: Tensor,
    *,
    outputs: OutputMode = "trace",
    implementation: Implementation = "auto",
    batch_size: int | None = None,
    memory_budget: int | float | str | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    progress: bool | Progress = False,
    allow_tf32: bool = False,
    shard: tuple[int, int] | None = None,
) -> tuple[Tensor, Tensor]:
    """The train Gram matrix K(x_train, x_train) and the cross kernel K(x_test, x_train) in one pass.

    Equal to ``empirical_ntk(model, x_train)`` and ``empirical_ntk(model, x_test, x_train)``, but every
    example's factors are computed once (two separate calls compute the training examples' twice) and the
    test-test block is skipped. Options as in :func:`empirical_ntk` (with ``outputs="full"`` both results have
    two trailing (k, k) dimensions).
    """

    def task(engine: _Engine, a: Tensor, b: Tensor | None, report: Progress | None) -> tuple[Tensor, Tensor]:
        return engine.train_test(a, a if b is None else b, report)

    options = dict(
        outputs=outputs, batch_size=batch_size, memory_budget=memory_budget, dtype=dtype, device=device, shard=shard
    )
    n1, n2 = _length(x_train), _length(x_test)
    workload = (n1 * n1 / 2 + n1 * n2, n1 + n2)
    return _compute(model, x_train, x_test, workload, task, implementation, progress, allow_tf32, **options)


def empirical_ntk_views(
    model: nn.Module,
    views: Sequence[Tensor],
    *,
    outputs: OutputMode = "trace",
    implementation: Implementation = "auto",
    batch_size: int | None = None,
    memory_budget: int | float | str | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    progress: bool | Progress = False,
    allow_tf32: bool = False,
    shard: tuple[int, int] | None = None,
) -> Tensor:
    r"""Per-example Gram matrices across views: :math:`G[i, a, b] = K(v_a[i], v_b[i])` for v views
    :math:`v_1, \dots, v_v` of the same n examples (e.g. images and their transforms).

    Each view of each example has its per-example factors computed once (v n in all), then v (v + 1) / 2
    row-wise products; no n x n matrix. This is what kernel-space invariance scores need:
    :math:`K(x, Tx) / \sqrt{K(x, x) K(Tx, Tx)}` for several transforms T at the cost of one diagonal per view.
    Options as in :func:`empirical_ntk`.

    Returns:
        The (n, v, v) tensor, symmetric in its last two dimensions, in ``dtype`` on the computation device;
        (n, v, v, k, k) for ``outputs="full"``, with ``G[i, b, a]`` the transposed block of ``G[i, a, b]``.
    """
    views = list(views) if not isinstance(views, Tensor) else [views]
    if not views or not all(isinstance(v, Tensor) and v.ndim and v.shape == views[0].shape for v in views):
        shapes = [tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__ for v in views]
        raise ConfigurationError(f"views must be a non-empty sequence of tensors of one shape (n, ...); got {shapes}.")
    count, n = len(views), len(views[0])

    def task(engine: _Engine, stacked: Tensor, _: Tensor | None, report: Progress | None) -> Tensor:
        return engine.views(list(stacked.split(n)), report)

    options = dict(
        outputs=outputs, batch_size=batch_size, memory_budget=memory_budget, dtype=dtype, device=device, shard=shard
    )
    workload = (n * count * (count + 1) / 2, n * count)
    stacked = torch.cat(views)
    return _compute(model, stacked, None, workload, task, implementation, progress, allow_tf32, **options)


@torch.compiler.disable  # (called inside a compiled function, dynamo would trace the whole engine)
def _compute(
    model: nn.Module,
    x1: Tensor,
    x2: Tensor | None,
    workload: tuple[float, float],
    task: Callable,
    implementation: str,
    progress: bool | Progress,
    allow_tf32: bool,
    *,
    outputs: OutputMode,
    batch_size: int | None,
    memory_budget: int | float | str | None,
    dtype: torch.dtype,
    device: torch.device | str | None,
    shard: tuple[int, int] | None,
):
    """Checks, model state handling and the choice of engine around ``task(engine, x1, x2, progress)``."""
    check_model(model, needs_trainable=True)
    check_options(dtype, batch_size=batch_size)
    if implementation not in IMPLEMENTATIONS:
        raise ConfigurationError(f"implementation={implementation!r} must be one of {list(IMPLEMENTATIONS)}.")
    budget = parse_memory_budget(memory_budget)
    _check_shard(shard)
    with eval_mode(model), autograd_enabled():
        x1, x2, trainable, fixed = prepare(model, x1, x2, dtype=dtype, device=device)
        select = resolve_outputs(outputs, model, trainable, fixed, x1)
        budget = budget or default_budget(x1.device)
        general = implementation == "vmap"
        tile, failures = TILE, 0
        with tf32(x1.device, allow_tf32), eager():
            while True:
                try:
                    sizes = _Sizes(batch_size, budget, tile, shard)
                    if general:
                        engine = _Engine(model, trainable, fixed, select, None, sizes)
                    else:
                        engine = _engine(model, trainable, fixed, select, x1, workload, implementation, sizes)
                    return _with_blocks(task(engine, x1, x2, _progress(progress)), select)
                except st.Unsupported as why:  # found past the probe (e.g. data-dependent control flow)
                    if implementation != "auto":
                        raise _unsupported_error(implementation, why) from why
                    _warn_fallback(why)
                    general = True
                except RuntimeError as err:  # torch.OutOfMemoryError is one
                    if not _out_of_memory(err):
                        raise
                    if failures == OOM_RETRIES:
                        n1, n2 = len(x1), len(x1 if x2 is None else x2)
                        raise KernelError(
                            f"the kernel computation ran out of memory {failures + 1} times, the last with a memory "
                            f"budget of {budget} bytes and {tile}-row strips ({err}). The result alone needs "
                            f"{n1 * n2 * dtype.itemsize} bytes; use fewer examples or a device with more memory."
                        ) from err
                    failures += 1
                    engine = None
                    if x1.device.type == "cuda":
                        torch.cuda.empty_cache()
                    budget, tile = budget // 2, max(16, tile // 2)
                    batch_size = None if batch_size is None else max(1, batch_size // 2)
                    warnings.warn(
                        f"empirical_ntk ran out of memory ({str(err).splitlines()[0][:120]}); retrying with half the "
                        f"memory budget ({budget} bytes) and {tile}-row strips.",
                        stacklevel=4,
                    )


def _out_of_memory(err: BaseException) -> bool:
    """A CUDA out-of-memory error or a failed CPU allocation."""
    text = str(err).lower()
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in text or "can't allocate memory" in text


def _with_blocks(result: Tensor | tuple[Tensor, ...], select: Outputs) -> Tensor | tuple[Tensor, ...]:
    """The "full" kernel of a one-logit model: its kernel with two trailing (1, 1) logit dimensions."""
    if not select.full or select.stacked:
        return result
    if isinstance(result, tuple):
        return tuple(r[..., None, None] for r in result)
    return result[..., None, None]


@dataclass(frozen=True)
class _Sizes:
    """How an engine cuts its work: examples per capture chunk (None: from the budget), the memory budget in bytes,
    rows per strip, and the shard ``(rank, world_size)`` it computes (None: everything)."""

    batch_size: int | None
    budget: int
    tile: int = TILE
    shard: tuple[int, int] | None = None


def _engine(
    model: nn.Module,
    trainable: State,
    fixed: State,
    select: Outputs,
    x1: Tensor,
    workload: tuple[float, float],
    implementation: str,
    sizes: _Sizes,
) -> _Engine:
    if implementation == "vmap":
        return _Engine(model, trainable, fixed, select, None, sizes)
    try:
        layers = st.plan(model, set(trainable))
        with _cpu.recording_calls(model) as called:  # (the probe is in float64: the audit checks it)
            probe = probe_capture(model, trainable, fixed, layers, x1, select)
        force = "materialised" if implementation == "materialised" else None
        pairs, examples = workload
        if select.stacked:  # a row per example and logit
            pairs, examples = pairs * select.count**2, examples * select.count
        widen = 1 if select.stacked else select.count
        st.choose_forms(layers, probe.captured[0], pairs, examples, force=force, widen=widen)
        audit_capture(model, probe, layers, select)
    except st.Unsupported as why:
        if implementation != "auto":
            raise _unsupported_error(implementation, why) from why
        _warn_fallback(why)
        return _Engine(model, trainable, fixed, select, None, sizes)
    obstacle = _cpu.concurrency_obstacle(model, called)
    structured = (layers, probe.captured, x1[: len(probe.x)])  # (the probe's own examples)
    return _Engine(model, trainable, fixed, select, structured, sizes, eps=probe.eps, obstacle=obstacle)


def _unsupported_error(implementation: str, why: Exception) -> ModelError:
    return ModelError(
        f"implementation={implementation!r} cannot compute this model's NTK exactly: {why}. Use "
        "implementation='auto' (falls back to the general path) or 'vmap'."
    )


def _warn_fallback(why: Exception) -> None:
    warnings.warn(
        f"empirical_ntk: the fast structured engine does not handle this model ({why}); using the general "
        "per-example-gradient path (exact, slower).",
        stacklevel=4,
    )


class _Engine:
    """Per-example factors of blocks of examples, and the tiled kernel built from them."""

    def __init__(
        self,
        model: nn.Module,
        trainable: State,
        fixed: State,
        select: Outputs,
        structured: tuple[list[st.Layer], list, Tensor] | None,
        sizes: _Sizes,
        eps: bool = False,
        obstacle: str | None = "not the structured engine",
    ) -> None:
        self.model, self.trainable, self.fixed, self.select = model, trainable, fixed, select
        self.budget, self.shard, self.tile = sizes.budget, sizes.shard, sizes.tile
        self.block = (select.count, select.count) if select.stacked else ()  # trailing dims of a kernel entry
        self.eps = eps  # capture with zeros added to the outputs (see ``_structured``), once the probe needed it
        workers = 1  # capture workers side by side (CPU, structured engine)
        tensor = next(iter(trainable.values()))
        self.like = tensor  # results and factors take its dtype and device, never the inputs' (e.g. integer ids)
        itemsize, s = tensor.element_size(), select.count
        if structured is None:
            self.layers = None
            self.n_jac = sum(p.numel() for p in trainable.values())
            self.per_example = _per_example_gradients(model, fixed, select)
            rows, wide = (s, 1) if select.stacked else (1, s)
            self.sample = st.Factors(tensor.new_empty(rows, self.n_jac * wide), [], s, select.stacked)
            self.example_bytes = s * self.n_jac * itemsize
            work = 3 * self.example_bytes
        else:
            self.layers, probe, x1 = structured
            self.n_jac = sum(st.n_materialised(layer) for layer in self.layers if not layer.structured)
            self.probe_x = x1
            blank = st.new_factors(self.layers, probe[0], len(self.probe_x), tensor, s, select.stacked)
            self.sample = st.factors(self.layers, probe, blank)
            if x1.device.type == "cpu":
                workers = _cpu.capture_workers(obstacle)
            self.replicas = _cpu.Replicas(model, self.layers, workers, self._probe_tensors)
            self.example_bytes = _factor_bytes(self.sample) // len(self.sample)
            live = [io for io in probe[0] if io is not None]
            activations = sum(a[:1].numel() + (1 + s) * g[:1].numel() for a, g in live)
            patches = sum(
                st.dims(layer, *io)[0] * st.dims(layer, *io)[1]
                for layer, io in zip(self.layers, probe[0], strict=True)
                if io is not None and layer.kind == "conv2d"
            )
            work = 2 * (activations + patches) * itemsize + 2 * self.example_bytes
        chunk = min(MAX_CHUNK, max(1, sizes.budget * CAPTURE_SHARE // (work * workers)))  # chunks side by side
        self.chunk = sizes.batch_size or int(chunk)
        self.resident = max(1, int(sizes.budget * RESIDENT_SHARE // max(1, self.example_bytes)))

    # ----------------------------------------------------------- factors
    def factors(self, x: Tensor) -> st.Factors:
        """Factors of all rows of ``x``, captured in chunks of ``self.chunk`` examples (on CPU, by several workers
        side by side: see :class:`~._cpu.Replicas`)."""
        out = st.empty_factors(self.sample, len(x))
        chunks = [slice(start, start + self.chunk) for start in range(0, len(x), self.chunk)]
        if self.layers is None:
            s = self.select.count
            for rows in chunks:
                grads, b = self.per_example(self.trainable, x[rows]), len(x[rows])
                if self.select.logits is None:
                    torch.cat([g.reshape(b, -1) for g in grads.values()], dim=1, out=out.rows(rows).jac)
                else:  # (b, s, P): logit after logit (side by side), or a row per example and logit (stacked)
                    block = torch.cat([g.reshape(b, s, -1) for g in grads.values()], dim=2)
                    out.rows(rows).jac.copy_(block.reshape(out.rows(rows).jac.shape))
            return out

        def work(model: nn.Module, layers: list[st.Layer], rows: slice) -> None:
            self._capture(model, layers, x[rows], out.rows(rows))

        self.replicas.capture(x, chunks, work)
        return out

    def _capture(self, model: nn.Module, layers: list[st.Layer], x: Tensor, block: st.Factors) -> None:
        state = {**self.trainable, **self.fixed}
        captured, eps = st.capture_any(model, state, layers, x, eps=self.eps, logits=self.select.logits)
        self.eps = self.eps or eps  # once one chunk needed the zeros, later chunks start with them
        st.factors(layers, captured, block)

    def _probe_tensors(self, model: nn.Module, layers: list[st.Layer]) -> list[Tensor]:
        """The factors of the probe's examples captured on ``model`` (the original or a replica) in the engine's
        dtype, for :class:`~._cpu.Replicas`' check."""
        block = st.empty_factors(self.sample, len(self.sample))
        self._capture(model, layers, self.probe_x, block)
        return _tensors(block)

    # ----------------------------------------------------------- kernels
    def run(self, x1: Tensor, x2: Tensor | None, paired: bool, progress: Progress | None) -> Tensor:
        if paired:
            return self._paired(x1, x2, progress)
        if x2 is None:
            return self._symmetric(x1, progress)
        return self._cross(x1, x2, progress)

    def _paired(self, x1: Tensor, x2: Tensor | None, progress: Progress | None) -> Tensor:
        out = self._new(len(x1), *self.block)
        chunks = self._tiles(len(x1), self.chunk)
        owns = self._owner(len(x1), lambda block: block.stop - block.start)
        for k, rows in enumerate(chunks):
            if not owns(rows):
                continue
            f1 = self.factors(x1[rows])
            out[rows] = paired_rows(f1, f1 if x2 is None else self.factors(x2[rows]))
            if progress:
                progress(k + 1, len(chunks))
        return out

    def views(self, views: list[Tensor], progress: Progress | None) -> Tensor:
        count, n = len(views), len(views[0])
        out = self._new(n, count, count, *self.block)
        chunks = self._tiles(n, max(1, min(self.chunk, self.resident // count)))
        owns = self._owner(n, lambda block: block.stop - block.start)
        for k, rows in enumerate(chunks):
            if not owns(rows):
                continue
            factors = [self.factors(view[rows]) for view in views]
            for a in range(count):
                for b in range(a, count):
                    out[rows, a, b] = block = paired_rows(factors[a], factors[b])
                    out[rows, b, a] = swap(block) if self.block else block
            if progress:
                progress(k + 1, len(chunks))
        return out

    def _new(self, *shape: int) -> Tensor:
        """The output: zeros when sharded (other ranks' entries stay 0 for the all-reduce)."""
        like = self.like  # the computation's dtype and device (the inputs may be integers)
        return like.new_zeros(shape) if self.shard else like.new_empty(shape)

    def _tiles(self, n: int, size: int) -> list[slice]:
        """Row tiles of at most ``size`` rows; when sharded, each inside one of the blocks of :meth:`_owner`."""
        if not self.shard:
            return _chunks(n, size)
        return [
            slice(b.start + t.start, b.start + t.stop)
            for b in _shard_blocks(n, self.shard)
            for t in _chunks(b.stop - b.start, size)
        ]

    def _owner(self, n: int, cost: Callable[[slice], float]) -> Callable[[slice], bool]:
        """Whether this shard computes the rows of a tile from :meth:`_tiles`: the blocks of
        :func:`_shard_blocks` (which depend on n and the world size only, never on the memory budget, the
        chunk or a retry's smaller tiles, which may differ between ranks) are assigned by :meth:`_mine`."""
        if not self.shard:
            return lambda rows: True
        blocks = _shard_blocks(n, self.shard)
        mine = self._mine([cost(block) for block in blocks])
        owned = [block for k, block in enumerate(blocks) if k in mine]
        return lambda rows: any(block.start <= rows.start < block.stop for block in owned)

    def _mine(self, costs: list[float]) -> set[int]:
        """Indices of the work units this shard computes: longest-processing-time-first assignment of the
        units to the ranks (the same on every rank), so that the ranks' total costs are balanced."""
        if not self.shard:
            return set(range(len(costs)))
        rank, world = self.shard
        loads = [0.0] * world
        mine = set()
        for unit in sorted(range(len(costs)), key=lambda u: (-costs[u], u)):
            owner = min(range(world), key=lambda r: (loads[r], r))
            loads[owner] += costs[unit]
            if owner == rank:
                mine.add(unit)
        return mine

    def _symmetric(self, x: Tensor, progress: Progress | None) -> Tensor:
        kernel = self._new(len(x), len(x), *self.block)

        def write(rows: slice, cols: slice, strip: Tensor) -> None:
            if cols.start == rows.start:  # the strip starts with its diagonal block
                width = rows.stop - rows.start
                kernel[rows, rows] = mirror_upper(strip[:, :width])
                strip, cols = strip[:, width:], slice(rows.stop, cols.stop)
            kernel[rows, cols] = strip
            kernel[cols, rows] = swap(strip)

        self._upper_strips(x, self._tiles(len(x), self.tile), write, progress)
        return kernel

    def train_test(self, x_train: Tensor, x_test: Tensor, progress: Progress | None) -> tuple[Tensor, Tensor]:
        """K(train, train) and K(test, train) from one pass: the upper part of the Gram matrix of
        [train; test] without its test-test block, so every example's factors are computed once."""
        n = len(x_train)
        k_train, k_test = self._new(n, n, *self.block), self._new(len(x_test), n, *self.block)
        shift = [slice(t.start + n, t.stop + n) for t in _chunks(len(x_test), self.tile)]

        def write(rows: slice, cols: slice, strip: Tensor) -> None:  # rows are training rows
            if cols.start == rows.start:
                width = rows.stop - rows.start
                k_train[rows, rows] = mirror_upper(strip[:, :width])
                strip, cols = strip[:, width:], slice(rows.stop, cols.stop)
            split = min(max(cols.start, n), cols.stop) - cols.start  # columns before the test rows
            train_cols = slice(cols.start, cols.start + split)
            k_train[rows, train_cols] = strip[:, :split]
            k_train[train_cols, rows] = swap(strip[:, :split])
            k_test[cols.start + split - n : cols.stop - n, rows] = swap(strip[:, split:])

        tiles = self._tiles(n, self.tile) + shift
        self._upper_strips(torch.cat([x_train, x_test]), tiles, write, progress, skip_from=n)
        return k_train, k_test

    def _upper_strips(
        self,
        x: Tensor,
        tiles: list[slice],
        write: Callable[[slice, slice, Tensor], None],
        progress: Progress | None,
        skip_from: int | None = None,
    ) -> None:
        """Hand ``write`` every strip K(rows, cols) of the upper triangle: for each row tile, the columns
        from its diagonal to the end of its panel, then each later column group (rows at or past
        ``skip_from`` are skipped). A panel's factors stay resident; later column groups are recomputed
        for each panel. Strips rather than square tiles: few, large matrix products."""
        panels = _groups(tiles, self.resident)
        live = [[rows for rows in panel if skip_from is None or rows.start < skip_from] for panel in panels]
        units = [  # (panel, column group, row tile, columns)
            (p, q, rows, slice(rows.start if q == p else panels[q][0].start, panels[q][-1].stop))
            for p in range(len(panels))
            for q in range(p, len(panels))
            for rows in live[p]
        ]
        # whole strips per shard: a row's strip costs its height times the columns from its diagonal on
        owns = self._owner(skip_from or len(x), lambda rows: (rows.stop - rows.start) * (len(x) - rows.start))
        units = [unit for unit in units if owns(unit[2])]
        done = 0
        for p, panel in enumerate(panels):
            todo = [unit for unit in units if unit[0] == p]
            if not todo:
                continue
            start, stop = panel[0].start, panel[-1].stop
            f_panel = self.factors(x[start:stop])
            for q in sorted({unit[1] for unit in todo}):
                group = slice(panels[q][0].start, panels[q][-1].stop)
                f_group = f_panel if q == p else self.factors(x[group])
                jobs = [(rows, cols) for _, q_, rows, cols in todo if q_ == q]
                with closing(self._strips(f_panel, f_group, jobs, start, group.start, write, upper=True)) as strips:
                    for _ in strips:  # (closing: the workers and the lock are released even if progress raises)
                        done += 1
                        if progress:
                            progress(done, len(units))

    def _cross(self, x1: Tensor, x2: Tensor, progress: Progress | None) -> Tensor:
        kernel = self._new(len(x1), len(x2), *self.block)
        panels = _groups(self._tiles(len(x1), self.tile), self.resident)
        groups = [slice(g[0].start, g[-1].stop) for g in _groups(_chunks(len(x2), self.tile), self.resident)]
        units = [(p, cols, rows) for p in range(len(panels)) for cols in groups for rows in panels[p]]
        owns = self._owner(len(x1), lambda rows: rows.stop - rows.start)  # whole rows of the kernel per shard
        units = [unit for unit in units if owns(unit[2])]
        cached = self.factors(x2) if len(groups) == 1 and units else None

        def write(rows: slice, cols: slice, tile: Tensor) -> None:
            kernel[rows, cols] = tile

        done = 0
        for p, panel in enumerate(panels):
            todo = [unit for unit in units if unit[0] == p]
            if not todo:
                continue
            start = panel[0].start
            f_panel = self.factors(x1[start : panel[-1].stop])
            for cols in groups:
                rows_here = [rows for _, c, rows in todo if c == cols]
                if not rows_here:
                    continue
                f_group = cached if cached is not None else self.factors(x2[cols])
                jobs = [(rows, cols) for rows in rows_here]
                with closing(self._strips(f_panel, f_group, jobs, start, cols.start, write)) as strips:
                    for _ in strips:
                        done += 1
                        if progress:
                            progress(done, len(units))
        return kernel

    def _strips(
        self,
        f1: st.Factors,
        f2: st.Factors,
        jobs: list[tuple[slice, slice]],
        offset1: int,
        offset2: int,
        write: Callable[[slice, slice, Tensor], None],
        upper: bool = False,
    ) -> Iterator[None]:
        """Compute and ``write`` K(rows, cols) for each job (the factors of two resident blocks starting at
        ``offset1`` and ``offset2``), yielding once per job done, in order (on CPU, wide factors' strips in parts
        side by side: see :func:`~._cpu.strips`; ``upper``: strips of the upper triangle)."""

        def run(rows: slice, cols: slice) -> None:
            write(rows, cols, self._tile(f1, f2, rows, cols, offset1, offset2))

        return _cpu.strips(jobs, run, f1, upper)

    @staticmethod
    def _tile(f1: st.Factors, f2: st.Factors, rows: slice, cols: slice, offset1: int, offset2: int) -> Tensor:
        """K(rows, cols) from the factors of two resident blocks starting at ``offset1`` and ``offset2``."""
        block1 = f1.rows(slice(rows.start - offset1, rows.stop - offset1))
        block2 = f2.rows(slice(cols.start - offset2, cols.stop - offset2))
        like = block1.jac if block1.jac is not None else block1.pairs[0][0]
        tile = gram(block1, block2, like.new_empty(block1.n_rows, block2.n_rows))
        if not block1.stacked:
            return tile
        s = block1.logits  # rows (i, a) by columns (j, b) -> (i, j, a, b)
        return tile.view(len(block1), s, len(block2), s).permute(0, 2, 1, 3)


def _per_example_gradients(model: nn.Module, fixed: State, select: Outputs) -> Callable:
    """``vmap``ped per-example gradients of the selected logits: ``f(trainable, x)`` gives, per trainable tensor,
    (b, *shape) for the model's one logit, or (b, s, *shape) for s selected logits."""
    if select.logits is None:
        return vmap(grad(lambda p, x: scalar_logit(model, p, fixed, x)), in_dims=(None, 0))
    logits = list(select.logits)
    return vmap(jacrev(lambda p, x: example_logits(model, p, fixed, x)[logits]), in_dims=(None, 0))


def _check_shard(shard: object) -> None:
    if shard is None:
        return
    ok = isinstance(shard, (tuple, list)) and len(shard) == 2 and all(isinstance(v, int) for v in shard)
    if not ok or not 0 <= shard[0] < shard[1]:
        raise ConfigurationError(
            f"shard={shard!r} must be (rank, world_size) with 0 <= rank < world_size, e.g. "
            "(torch.distributed.get_rank(), torch.distributed.get_world_size()); None computes everything."
        )


def _length(x: object) -> int:
    return len(x) if isinstance(x, Tensor) and x.ndim else 0


def _tensors(factors: st.Factors) -> list[Tensor]:
    return ([] if factors.jac is None else [factors.jac]) + [t for pair in factors.pairs for t in pair]


def _factor_bytes(factors: st.Factors) -> int:
    return sum(t.numel() * t.element_size() for t in _tensors(factors))


def _shard_blocks(n: int, shard: tuple[int, int]) -> list[slice]:
    """The rows of an n-row result cut into blocks of near-equal size: about four per rank (for balance), but
    at least 16 rows and at most :data:`TILE` each. These are the units shards are assigned; they depend on n
    and the world size alone, so that every rank cuts the work alike whatever its memory."""
    return _chunks(n, min(TILE, max(16, -(-n // (4 * shard[1])))))


def _chunks(n: int, size: int) -> list[slice]:
    """The fewest chunks of at most ``size`` examples, of near-equal sizes (no small last chunk)."""
    count = -(-n // size)
    bounds = [n * i // count for i in range(count + 1)]
    return [slice(start, stop) for start, stop in zip(bounds[:-1], bounds[1:], strict=True)]


def _groups(tiles: list[slice], max_rows: int) -> list[list[slice]]:
    """Consecutive tiles grouped so that each group holds at most ``max_rows`` rows (at least one tile)."""
    groups: list[list[slice]] = [[]]
    for tile in tiles:
        rows = sum(t.stop - t.start for t in groups[-1])
        if groups[-1] and rows + tile.stop - tile.start > max_rows:
            groups.append([])
        groups[-1].append(tile)
    return groups


def _progress(progress: bool | Progress) -> Progress | None:
    if callable(progress):
        return progress
    if not progress:
        return None
    from tqdm.auto import tqdm

    bar = None

    def update(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc="empirical NTK tiles", leave=False)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    return update
