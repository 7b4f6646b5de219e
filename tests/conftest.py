import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VIALINSPECT_NO_PROGRESS", "1")

import pytest  # noqa: E402

from datasets.generate import generate  # noqa: E402
from datasets.sim.config import SimConfig  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """24 containers, 3 frames each, all formats: shared by the read-only dataset tests."""
    out = tmp_path_factory.mktemp("tiny") / "data"
    generate(out, 24, SimConfig(frames=3, defect_rate=0.6), seed=11, workers=2)
    return out
