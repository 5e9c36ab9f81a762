"""Every registered backend conforms to ``HardMarginBackend`` (signature and result), and the estimator dispatches
through that contract only (a stand-in backend registered under a new name is enough for ``HardMarginSVM``)."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import sys
import types

import numpy as np
import pytest

from lightning_afterkernel.errors import ConfigurationError
from lightning_afterkernel.svm import (
    DeviceBackend,
    DualResult,
    HardMarginBackend,
    HardMarginSVM,
    available_backends,
    protocol,
    torch_backend,
)
from lightning_afterkernel.svm._checks import check_and_normalize_kernel, training_margins

POSITIONAL = ("K", "y_pm", "fit_intercept", "tol", "max_iter", "time_limit")


def _module(name: str) -> types.ModuleType:
    return importlib.import_module(protocol.BACKENDS[name])  # importable even when the optional package is not


def _usable(name: str) -> types.ModuleType:
    try:
        return protocol.load_backend(name)
    except ConfigurationError as err:
        pytest.skip(str(err))


@pytest.mark.parametrize("name", list(protocol.BACKENDS))
def test_every_backend_declares_the_contract(name):
    module = _module(name)
    assert isinstance(module, HardMarginBackend)
    assert isinstance(module, DeviceBackend) == (name in ("auto", "torch"))
    for constant in ("DEFAULT_TOL", "MARGIN_TOL"):
        value = getattr(module, constant)
        assert isinstance(value, float) and 0.0 < value < 1.0
    assert list(inspect.signature(module.check_available).parameters) == []
    assert list(inspect.signature(module.share_kernel).parameters) == ["K"]
    params = list(inspect.signature(module.fit_dual).parameters.values())
    assert tuple(p.name for p in params[:6]) == POSITIONAL
    assert all(p.kind is p.POSITIONAL_OR_KEYWORD and p.default is p.empty for p in params[:6])
    extra = {p.name: p for p in params[6:]}
    assert all(p.kind is p.KEYWORD_ONLY and p.default is not p.empty for p in extra.values()), "extras need defaults"
    assert extra["shared"].default is None
    if isinstance(module, DeviceBackend):
        assert extra["device"].default is None and extra["shrinking"].default is True
        assert list(inspect.signature(module.resolve_device).parameters) == ["device"]


@pytest.mark.parametrize("fit_intercept", [False, True])
@pytest.mark.parametrize("name", list(protocol.BACKENDS))
def test_every_backend_returns_a_dual_result(name, fit_intercept, separable):
    module = _usable(name)
    K, _ = check_and_normalize_kernel(separable.K, pad=2)  # as the estimator hands it over
    y = 2.0 * separable.y - 1.0
    shared = module.share_kernel(K)
    result = module.fit_dual(K, y, fit_intercept, module.DEFAULT_TOL, None, 60.0, shared=shared)
    assert isinstance(result, DualResult)
    assert result.alpha.shape == y.shape and result.alpha.dtype == np.float64
    assert np.isfinite(result.alpha).all() and (result.alpha >= 0.0).all() and result.alpha.sum() > 0.0
    assert isinstance(result.intercept, float) and (fit_intercept or result.intercept == 0.0)
    assert isinstance(result.n_iter, int) and result.n_iter >= 0 and result.converged is True
    assert all(isinstance(k, str) and isinstance(v, float) for k, v in result.info.items())
    margins = training_margins(K, y, result.alpha, result.intercept)
    if result.margins is not None:
        np.testing.assert_allclose(result.margins, margins, rtol=1e-12, atol=1e-12)
    assert margins.min() >= 1.0 - module.MARGIN_TOL
    if not fit_intercept:  # shared=None: the backend does that work itself, and solves the same problem
        alone = module.fit_dual(K, y, fit_intercept, module.DEFAULT_TOL, None, 60.0)
        np.testing.assert_allclose(alone.alpha, result.alpha, rtol=1e-9, atol=1e-12 * result.alpha.max())


def test_available_backends_are_those_that_load():
    names = available_backends()
    assert names[:3] == ("auto", "torch", "sklearn")
    for name in protocol.BACKENDS:
        module = _module(name)
        try:
            module.check_available()
        except ConfigurationError:
            assert name not in names
        else:
            assert name in names


def _stand_in(calls: dict[str, list]) -> types.ModuleType:
    """A backend module that delegates to the interior-point method and records what the estimator passes it."""
    module = types.ModuleType("stand_in_backend")
    module.DEFAULT_TOL = 1e-9
    module.MARGIN_TOL = 1e-6
    module.check_available = lambda: calls["check"].append(True)

    def share_kernel(K):
        token = object()
        calls["share"].append(token)
        return token

    def fit_dual(K, y_pm, fit_intercept, tol, max_iter, time_limit, *, shared=None):
        calls["fit"].append(shared)
        result = torch_backend.fit_dual(K, y_pm, fit_intercept, tol, max_iter, time_limit)
        return dataclasses.replace(result, backend="stand-in")

    module.share_kernel, module.fit_dual = share_kernel, fit_dual
    return module


def test_the_estimator_dispatches_through_the_contract(monkeypatch, separable, multiclass):
    """A conforming module under a new name fits; one-vs-rest shares K's work once across its k problems."""
    calls: dict[str, list] = {"check": [], "share": [], "fit": []}
    module = _stand_in(calls)
    assert isinstance(module, HardMarginBackend) and not isinstance(module, DeviceBackend)
    monkeypatch.setitem(sys.modules, "stand_in_backend", module)
    monkeypatch.setitem(protocol.BACKENDS, "stand-in", "stand_in_backend")
    est = HardMarginSVM(backend="stand-in").fit(separable.K, separable.y)
    ref = HardMarginSVM(backend="torch").fit(separable.K, separable.y)
    assert est.backend_ == "stand-in" and calls["check"] and calls["share"] == [] and calls["fit"] == [None]
    np.testing.assert_array_equal(est.alpha_, ref.alpha_)
    with pytest.raises(ConfigurationError, match="device='cpu' applies to the interior-point backends"):
        HardMarginSVM(backend="stand-in", device="cpu").check_params()
    X, labels, _, _ = multiclass(150)
    multi = HardMarginSVM(backend="stand-in").fit(X @ X.T, labels)
    assert len(calls["share"]) == 1 and calls["fit"][1:] == calls["share"] * 3
    assert multi.backend_ == ["stand-in"] * 3
