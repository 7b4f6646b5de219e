import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VIALINSPECT_NO_PROGRESS", "1")

import pytest  # noqa: E402

from vialinspect.datasets.generate import generate  # noqa: E402
from vialinspect.datasets.sim.config import CameraConfig, SimConfig  # noqa: E402

SMALL_WIDTHS = (8, 8, 12, 16, 16)
# The earlier default's map head and branch width (the training defaults are "separable" and 8): tests whose tiny
# one-epoch model must learn enough to show an effect train with these.
EARLIER_NETWORK = {"map_head": "dense", "branch_width": 16}


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """24 containers, 3 frames each, all formats: shared by the read-only dataset tests."""
    out = tmp_path_factory.mktemp("tiny") / "data"
    generate(out, 24, SimConfig(frames=3, defect_rate=0.6), seed=11, workers=2)
    return out


@pytest.fixture(scope="session")
def coarse_data(tmp_path_factory):
    """Low-resolution (120 µm/px) containers, 2 frames each, so a training step takes milliseconds."""
    out = tmp_path_factory.mktemp("coarse") / "data"
    generate(out, 48, SimConfig(frames=2, defect_rate=0.6, camera=CameraConfig(pixel_um=120.0)), seed=3, workers=2)
    return out


def small_config(**kw):
    from vialinspect.training.config import TrainConfig

    base = dict(epochs=2, batch_size=4, workers=0, widths=SMALL_WIDTHS, lr=3e-3, threads=1, crop=64, crop_batch=4)
    base.update(kw)
    return TrainConfig.from_dict(base)


@pytest.fixture(scope="session")
def tiny_run(coarse_data, tmp_path_factory):
    """A tiny model trained for one epoch on ``coarse_data``: its best.pt has calibrated thresholds."""
    from vialinspect.training.trainer import train

    run = tmp_path_factory.mktemp("tiny_run")
    # init "auto" (the CLI's default) trains data with masks from random weights (tests/test_training.py checks)
    # The earlier default's dense map head and 16-channel branches: in one epoch at these widths the training
    # defaults' separable head leaves no defective unit rejected for its defect in every pass, which the
    # qualification tests need (the separable head's training is tested in test_training.py).
    train(coarse_data, run, small_config(epochs=1, **EARLIER_NETWORK), init="auto", progress=False,
          log=lambda *a: None)
    return run


@pytest.fixture(scope="session")
def tiny_package(tiny_run, coarse_data, tmp_path_factory):
    """``tiny_run``'s model exported as a package (read-only for the tests that share it: copy it to change it)."""
    from vialinspect.cli import main

    out = tmp_path_factory.mktemp("pkg") / "model"
    assert main(["export", "--checkpoint", str(tiny_run / "best.pt"), "--out", str(out),
                 "--parity-data", str(coarse_data), "--parity-count", "4"]) == 0
    return out
