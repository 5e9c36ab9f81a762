"""End to end on the real MNIST 3-vs-8 split from ../shared/data (skipped when the folder is absent)."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl

from lightning_afterkernel.callbacks import AfterKernelCallback
from lightning_afterkernel.data import BinaryPairDataModule
from lightning_afterkernel.models import MLPClassifier, VGGClassifier

pytestmark = pytest.mark.real_data


@pytest.mark.parametrize("model_cls", [VGGClassifier, MLPClassifier])
def test_paper_network_on_full_mnist_3_vs_8(model_cls, shared_data, tmp_path):
    pl.seed_everything(0)
    dm = BinaryPairDataModule(dataset="mnist", root=str(shared_data))
    model = model_cls(input_shape=dm.input_shape)
    callback = AfterKernelCallback(epochs=[0], at_end=True, n_train=400, n_test=300, verbose=False)
    trainer = pl.Trainer(
        max_epochs=1, callbacks=[callback], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path, accelerator="cpu",
    )
    trainer.fit(model, datamodule=dm)

    assert len(dm.train_dataset) == 11_982 and len(dm.test_dataset) == 1_984
    assert trainer.global_step == 375  # ceil(11,982 / 32): one epoch of plain SGD at batch size 32
    assert callback.done_epochs == [0, 1]
    ntk = {r["epoch"]: r for r in callback.results if r["kernel"] == "ntk"}
    # 3 vs 8 is easy: even the initial kernel's SVM is far above chance on 400 training images
    assert ntk[0]["svm_separable"] == 1 and ntk[0]["svm_test_acc"] > 0.85
    assert ntk[1]["svm_separable"] == 1 and ntk[1]["svm_test_acc"] > 0.85
    assert ntk[1]["network_test_acc"] > 0.9  # one epoch on the full split trains the network
    assert ntk[0]["network_test_acc"] < ntk[1]["network_test_acc"]
    assert 0 < ntk[1]["alignment_to_initial"] < 1  # training moved the kernel
    assert abs(ntk[1]["svm_min_margin"] - 1) < 1e-2
