"""Process-wide settings the engine holds while it computes (dynamo's stance, CUDA's TF32 switches), shared by
overlapping calls: correctness under several threads' calls, not speed."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from lightning_afterkernel.errors import ConfigurationError


class ProcessSetting:
    """A process-wide setting that overlapping engine calls (from several threads, or nested) hold together: the
    first to enter saves the current value and sets the engine's, the last to leave restores it. A save and
    restore per call would restore it under another thread's running call, and leave that call's value behind
    for good. A call that needs another value than the one held waits until the holders are done (in another
    thread), or (in a thread that holds it already) raises."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._changed = threading.Condition()
        self._holders: list[int] = []  # thread ids, one per call holding it
        self._value: object = None
        self._restore: Callable[[], None] | None = None

    @contextmanager
    def held(self, value: object, apply: Callable[[object], Callable[[], None]]) -> Iterator[None]:
        """Hold the setting at ``value``; ``apply(value)`` sets it and returns what restores the previous one."""
        me = threading.get_ident()
        with self._changed:
            while self._holders and self._value != value:
                if me in self._holders:
                    raise ConfigurationError(
                        f"a kernel computed inside another (e.g. from its progress callback) asks for {self.name}="
                        f"{value!r} while the outer one holds {self._value!r}; use the same setting for both."
                    )
                self._changed.wait()
            if not self._holders:
                self._restore, self._value = apply(value), value
            self._holders.append(me)
        try:
            yield
        finally:
            with self._changed:
                self._holders.remove(me)
                if not self._holders:
                    restore, self._restore, self._value = self._restore, None, None
                    self._changed.notify_all()
                    restore()


_STANCE = ProcessSetting("dynamo's stance")
_TF32 = ProcessSetting("allow_tf32")


@contextmanager
def eager() -> Iterator[None]:
    """``torch.compile``d modules and functions run eagerly inside (dynamo's "force_eager" stance, process-wide:
    compiled code in other threads runs eagerly meanwhile; the previous stance is set again when the last
    overlapping call ends). The capture's hooks record layer outputs and take gradients with respect to them; in
    a graph compiled with AOT autograd (``backend="aot_eager"`` or the default inductor) those outputs are
    siblings of the logit, not on its path, so their gradients came out None and the kernel wrong (0.23 relative
    error on a small MLP). The kernel needs no compilation: each chunk is one forward and backward."""
    with _STANCE.held("force_eager", _force_eager):
        yield


def _force_eager(stance: object) -> Callable[[], None]:
    setter = torch.compiler.set_stance(stance)  # (set now; its __exit__ sets the previous stance again)
    return lambda: setter.__exit__(None, None, None)


@contextmanager
def tf32(device: torch.device, allow: bool) -> Iterator[None]:
    """On CUDA, TF32 in matmuls and cuDNN convolutions exactly when ``allow`` (process-wide while any kernel is
    computed; see :class:`ProcessSetting`). cuDNN convolutions default to TF32, which would cost the kernel
    about three decimal digits."""
    if device.type != "cuda":
        yield
        return
    with _TF32.held(bool(allow), _set_tf32):
        yield


def _set_tf32(allow: object) -> Callable[[], None]:
    settings = [
        (torch.backends.cuda.matmul, "fp32_precision", "tf32" if allow else "ieee"),
        (torch.backends.cudnn.conv, "fp32_precision", "tf32" if allow else "ieee"),
    ]
    if not hasattr(torch.backends.cuda.matmul, "fp32_precision"):  # torch < 2.9: the older switches
        settings = [(torch.backends.cuda.matmul, "allow_tf32", allow), (torch.backends.cudnn, "allow_tf32", allow)]
    saved = [getattr(owner, name) for owner, name, _ in settings]
    for owner, name, value in settings:
        setattr(owner, name, value)

    def restore() -> None:
        for (owner, name, _), value in zip(settings, saved, strict=True):
            setattr(owner, name, value)

    return restore
