"""The evaluation, the result row and the summary table without a Trainer: plain functions on small tensors and
models, against direct computations."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from lightning_afterkernel.callbacks import evaluation
from lightning_afterkernel.callbacks._checks import check_model_and_labels
from lightning_afterkernel.callbacks.evaluation import (
    AnalysisOptions,
    KernelOptions,
    Subsets,
    analyse,
    compute_kernels,
    fit_svm,
    initial_train_kernels,
    invariance_families,
)
from lightning_afterkernel.callbacks.rows import (
    INVARIANCE_FAMILIES,
    KERNEL_METRICS,
    ResultRow,
    invariance_key,
    logged_metrics,
)
from lightning_afterkernel.callbacks.summary import summary_table
from lightning_afterkernel.errors import DataError, ModelError
from lightning_afterkernel.invariance import invariance_scores
from lightning_afterkernel.kernels import (
    centered_kernel_alignment,
    conjugate_kernel,
    effective_rank,
    empirical_ntk,
    kernel_alignment,
    kernel_target_alignment,
)
from lightning_afterkernel.models import MLPClassifier
from lightning_afterkernel.svm import HardMarginSVM

SHAPE = (1, 8, 8)


def subsets(n_train: int = 24, n_test: int = 12) -> Subsets:
    g = torch.Generator().manual_seed(0)
    x = 0.6 * torch.rand(n_train + n_test, *SHAPE, generator=g)
    y = torch.arange(n_train + n_test) % 2
    x[y == 1, :, :4] += 0.4
    return Subsets(x[:n_train], y[:n_train], x[n_train:], y[n_train:])


def mlp() -> MLPClassifier:
    torch.manual_seed(0)
    return MLPClassifier(input_shape=SHAPE, width=48)


def test_kernels_and_analyses_equal_direct_computations():
    model, data = mlp(), subsets()
    options = AnalysisOptions(families=INVARIANCE_FAMILIES, n_invariance=6)
    kernels = compute_kernels(model, data, ["ntk", "ck"], KernelOptions(dtype=torch.float64), epoch=3)
    assert kernels.failures == {} and set(kernels.grams) == {"ntk", "ck"}
    direct = {"ntk": empirical_ntk, "ck": conjugate_kernel}
    for name, fn in direct.items():
        k_train, k_test, seconds = kernels.grams[name]
        torch.testing.assert_close(k_train, fn(model, data.x_train, dtype=torch.float64))
        torch.testing.assert_close(k_test, fn(model, data.x_test, data.x_train, dtype=torch.float64))
        assert seconds > 0

    initial = {"ntk": 2 * kernels.grams["ntk"][0]}  # a made-up epoch-0 kernel: alignment 1, distance 1/2
    analysis = analyse(model, data, kernels, ["ntk", "ck"], epoch=3, step=30, initial=initial, options=options)
    rows = {row.kernel: row for row in analysis.rows}
    grams = {name: kernels.grams[name][0].double() for name in direct}
    with torch.no_grad():
        network = float(((model(data.x_test) > 0) == (data.y_test > 0)).double().mean())
    for name, row in rows.items():
        k = grams[name]
        svm = HardMarginSVM().fit(k, data.y_train)
        assert (row.epoch, row.step, row.error) == (3, 30, None)
        assert row.svm_test_acc == pytest.approx(svm.score(kernels.grams[name][1].double(), data.y_test))
        assert row.svm_n_support == svm.n_support_ and row.svm_separable == 1
        assert row.kta == pytest.approx(kernel_target_alignment(k, data.y_train))
        assert row.effective_rank == pytest.approx(effective_rank(k, "trace"))
        assert row.effective_rank_entropy == pytest.approx(effective_rank(k, "entropy"))
        assert row.network_test_acc == pytest.approx(network)
        assert row.alignment_ntk_ck == pytest.approx(kernel_alignment(grams["ntk"], grams["ck"]))
        assert row.cka_ntk_ck == pytest.approx(centered_kernel_alignment(grams["ntk"], grams["ck"]))
        scores = invariance_scores(model, data.x_test[:6], kernel=name, dtype=torch.float64)
        assert row.invariance == pytest.approx(scores)
        torch.testing.assert_close(analysis.spectra[name], torch.linalg.eigvalsh(k).flip(0))
    assert rows["ntk"].alignment_to_initial == pytest.approx(1.0)
    assert rows["ntk"].distance_to_initial == pytest.approx(0.5)
    assert math.isnan(rows["ck"].alignment_to_initial)  # no epoch-0 CK given


def test_non_finite_outputs_fail_every_kernel_and_give_failed_rows():
    model = mlp()
    with torch.no_grad():
        model.head.bias.fill_(math.nan)
    data = subsets()
    kernels = compute_kernels(model, data, ["ntk", "ck"], KernelOptions(), epoch=2)
    assert kernels.grams == {} and kernels.logits is None
    assert set(kernels.failures) == {"ntk", "ck"} and "not finite" in kernels.failures["ntk"]
    analysis = analyse(model, data, kernels, ["ntk", "ck"], epoch=2, options=AnalysisOptions(families=("shift",)))
    for row in analysis.rows:
        assert row.failed and "not finite" in row.error
        assert all(math.isnan(getattr(row, key)) for key in KERNEL_METRICS)
        assert math.isnan(row.invariance["shift"]) and math.isnan(row.alignment_ntk_ck)
    assert analysis.grams == {}


def test_a_kernel_without_a_hard_margin_gets_the_soft_margin_fallback():
    data = subsets()
    x = data.x_train.flatten(1).double()
    x[1] = x[0]  # the same point with both labels: no hard margin exists
    k = x @ x.T
    k_test = data.x_test.flatten(1).double() @ x.T
    with pytest.warns(UserWarning, match="no hard-margin SVM for the ntk kernel at epoch 4.*Soft-margin fallback"):
        fields = fit_svm("ntk", 4, k, data.y_train, k_test, data.y_test, AnalysisOptions(soft_margin_c=1.0))
    assert fields["svm_separable"] == 0 and fields["svm_n_support"] == -1 and math.isnan(fields["svm_test_acc"])
    assert 0.5 < fields["svm_soft_test_acc"] <= 1
    with pytest.warns(UserWarning, match="no hard-margin SVM"):
        off = fit_svm("ntk", 4, k, data.y_train, k_test, data.y_test, AnalysisOptions(soft_margin_c=None))
    assert math.isnan(off["svm_soft_test_acc"])


def test_initial_kernels_are_computed_on_the_given_weights_and_the_model_keeps_its_own():
    model, data = mlp(), subsets()
    initial = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    trained = [p.detach().clone() for p in model.parameters()]
    tensors = list(model.parameters())
    kernels = initial_train_kernels(model, initial, data, ["ntk", "ck"], KernelOptions(dtype=torch.float64))
    assert all(p is q and torch.equal(p, t) for p, q, t in zip(model.parameters(), tensors, trained, strict=True))
    reference = mlp()
    assert kernels["ntk"].dtype == torch.float32
    torch.testing.assert_close(kernels["ntk"], empirical_ntk(reference, data.x_train).float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kernels["ck"], conjugate_kernel(reference, data.x_train).float(), rtol=1e-5, atol=1e-6)


def test_invariance_families_follow_the_images():
    assert invariance_families(torch.zeros(4, 1, 8, 8), 10) == (INVARIANCE_FAMILIES, None)
    assert invariance_families(torch.zeros(4, 1, 8, 8), 0) == ((), None)
    odd, message = invariance_families(torch.zeros(4, 1, 7, 7), 10)
    assert odd == INVARIANCE_FAMILIES[1:] and "globalness score is skipped" in message
    flat, message = invariance_families(torch.zeros(4, 16), 10)
    assert flat == () and "not floating-point image batches" in message


def test_a_row_round_trips_through_the_results_file_and_logs_the_documented_keys():
    row = ResultRow(epoch=1.5, step=9, kernel="ck", network_test_acc=0.75, svm_test_acc=0.5, svm_separable=1)
    row.svm_n_support, row.alignment_ntk_ck, row.cka_ntk_ck = 7, 0.25, math.nan
    row.invariance = {"shift": 0.875, "zoom": math.nan}
    plain = row.to_dict()
    assert plain[invariance_key("shift")] == 0.875 and "error" not in plain
    on_disk = json.loads(json.dumps(row.to_json(), allow_nan=False))
    assert on_disk["svm_soft_test_acc"] is None and on_disk["invariance_zoom"] is None
    back = ResultRow.from_dict(on_disk)
    assert json.dumps(back.to_json()) == json.dumps(row.to_json())
    assert back.separable is True and back.accuracy == (0.5, True)

    logged = logged_metrics([row], "afterkernel/f64")
    assert set(logged) == {
        "afterkernel/f64/epoch",
        "afterkernel/f64/network_test_acc",
        *(f"afterkernel/f64/ck/{key}" for key in KERNEL_METRICS),
        "afterkernel/f64/ck/invariance/shift",
        "afterkernel/f64/ck/invariance/zoom",
        "afterkernel/f64/alignment_ntk_ck",
        "afterkernel/f64/cka_ntk_ck",
    }
    assert logged["afterkernel/f64/epoch"] == 1.5 and logged["afterkernel/f64/ck/svm_n_support"] == 7.0
    soft = ResultRow(epoch=0, step=0, kernel="ntk", svm_separable=0, svm_soft_test_acc=0.625)
    assert soft.accuracy == (0.625, False) and logged_metrics([soft])["afterkernel/ntk/svm_soft_test_acc"] == 0.625
    failed = ResultRow.from_dict({"epoch": 2, "kernel": "ntk", "error": "boom", "svm_separable": None})
    assert failed.failed and failed.separable is None and failed.step is None


def test_the_summary_table_reads_rows():
    rows = [
        ResultRow(epoch=0, step=0, kernel="ntk", network_test_acc=0.5, svm_test_acc=0.75, svm_separable=1),
        ResultRow(epoch=0, step=0, kernel="ck", network_test_acc=0.5, svm_separable=0, svm_soft_test_acc=0.625),
        ResultRow(epoch=2, step=8, kernel="ntk", network_test_acc=0.875, error="out of memory"),
        ResultRow(epoch=2, step=8, kernel="ck", network_test_acc=0.875, svm_test_acc=1.0, svm_separable=1, kta=0.5),
    ]
    rows[3].invariance = {"rotation": 0.25}
    table = summary_table(
        [r.to_dict() for r in rows],
        ["ntk", "ck"],
        n_train=40,
        n_test=20,
        soft_margin_c=1.0,
        n_invariance=10,
        invariance_images="test",
    )
    lines = {line.split("  ")[0]: line.split() for line in table.splitlines()}
    assert lines["NTK SVM"][-2:] == ["75.00%", "failed"]
    assert lines["CK SVM"][-3:] == ["62.50%", "(soft)", "100.00%"]
    assert lines["network itself"][-2:] == ["50.00%", "87.50%"]
    assert lines["CK kernel-target alignment"][-2:] == ["-", "0.500"]
    assert lines["CK rotation"][-2:] == ["-", "0.250"] and "NTK rotation" in lines
    assert "(soft): no hard-margin SVM" in table and "over 10 test images" in table


def test_the_model_check_accepts_one_logit_per_example_and_restores_the_modes():
    data = subsets()
    model = mlp().train()
    check_model_and_labels(model, data)  # (n,) logits, labels 0/1
    assert model.training
    column = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 1))  # (n, 1), labels -1/1
    check_model_and_labels(column, Subsets(data.x_train, 2 * data.y_train - 1, data.x_test, 2 * data.y_test - 1))
    pair = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 2))
    assert check_model_and_labels(pair, data, n=3) == 2  # two logits, labels 0/1
    grid = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 6), torch.nn.Unflatten(1, (2, 3)))
    with pytest.raises(ModelError, match=r"Sequential returns shape \(3, 2, 3\) on 3 training examples"):
        check_model_and_labels(grid, data, n=3)
    mixed = Subsets(data.x_train, data.y_train, data.x_test, 2 * data.y_test - 1)  # 0/1 and -1/1 together
    with pytest.raises(DataError, match=r"labels \[0, 1\] \(train\) and \[-1, 1\] \(test\)"):
        check_model_and_labels(model, mixed)


class OnTheCard:
    """Stands for a kernel on a GPU (its device says cuda) where there is none: ``to`` gives CPU tensors."""

    device = torch.device("cuda")

    def __init__(self, kernel: torch.Tensor) -> None:
        self.kernel = kernel

    def to(self, *args) -> torch.Tensor:
        return self.kernel.to(*(a for a in args if not (isinstance(a, str) and a.startswith("cuda"))))


def test_an_analysis_with_no_room_on_the_card_is_redone_on_the_cpu(monkeypatch):
    """The GPU-to-CPU retry without a GPU: the SVM asked for on the card runs out of memory, the SVM and metrics are
    redone on the CPU (the SVM too, whatever svm={"device": ...} says) with a warning, and give the CPU's answer."""

    model, data = mlp(), subsets()
    kernels = compute_kernels(model, data, ["ntk"], KernelOptions(dtype=torch.float64))
    k_train, k_test, seconds = kernels.grams["ntk"]
    options = AnalysisOptions(svm={"device": "cuda"})
    real, devices = evaluation.fit_svm, []

    def no_room_unless_cpu(*args, device=None):
        devices.append(device)
        if device != "cpu":
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(*args, device=device)

    monkeypatch.setattr(evaluation, "fit_svm", no_room_unless_cpu)
    on_card = evaluation.Kernels(kernels.logits, {"ntk": (OnTheCard(k_train), k_test, seconds)}, {})
    with pytest.warns(UserWarning, match="NTK SVM and analyses at epoch 0 ran out of GPU memory .*on the CPU"):
        (row,) = analyse(model, data, on_card, ["ntk"], options=options).rows
    assert devices == [None, "cpu"]
    monkeypatch.setattr(evaluation, "fit_svm", real)
    (expected,) = analyse(model, data, kernels, ["ntk"], options=AnalysisOptions(svm={"device": "cpu"})).rows
    assert row.error is None and row.svm_separable == 1
    assert [row.svm_test_acc, row.svm_n_support, row.kta] == [
        expected.svm_test_acc,
        expected.svm_n_support,
        expected.kta,
    ]


def test_large_kernels_take_the_trace_rank_from_lanczos_and_leave_the_entropy_rank_out(monkeypatch):
    """Above ENTROPY_RANK_MAX_N examples no full eigendecomposition: the paper's rank from lambda_max alone (as
    the full spectrum gives it), the figure's top eigenvalues, and the entropy rank NaN with a warning."""
    from lightning_afterkernel.kernels import eigenspectrum

    generator = torch.Generator().manual_seed(0)
    features = torch.randn(120, 30, generator=generator, dtype=torch.float64)
    k_train = features @ features.mT
    y = (torch.arange(120) % 2).long()
    small, _ = evaluation.kernel_metrics("ntk", 1, k_train, y)
    monkeypatch.setattr(evaluation, "ENTROPY_RANK_MAX_N", 100)
    monkeypatch.setattr(evaluation, "SPECTRUM_TOP", 12)
    with pytest.warns(UserWarning, match="entropy effective rank is left out"):
        large, eigenvalues = evaluation.kernel_metrics("ntk", 1, k_train, y)
    full = eigenspectrum(k_train)
    assert abs(large["effective_rank"] - effective_rank(full, "trace")) < 1e-6 * small["effective_rank"]
    assert abs(large["effective_rank"] - small["effective_rank"]) < 1e-6 * small["effective_rank"]
    assert math.isnan(large["effective_rank_entropy"]) and not math.isnan(small["effective_rank_entropy"])
    assert len(eigenvalues) == 12 and torch.allclose(eigenvalues, full[:12], rtol=0, atol=1e-6 * float(full[0]))
    with pytest.warns(UserWarning, match="entropy effective rank is left out"):
        without_figure, none = evaluation.kernel_metrics("ntk", 1, k_train, y, figure=False)
    assert without_figure["effective_rank"] == large["effective_rank"] and len(none) == 0
