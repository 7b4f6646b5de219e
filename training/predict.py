"""Run a trained network over containers and get ``Scores``: used by evaluation and calibration."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from vialinspect.datasets.imageio import read_gray
from vialinspect.datasets.records import ContainerRecord
from vialinspect.vision.fill_gauge import FillGauge, GaugeReading, apply_reading
from vialinspect.vision.model import InferenceModel
from vialinspect.vision.pair import Network
from vialinspect.vision.postprocess import to_scores
from vialinspect.vision.preprocess import InputSpec, Prepared, preprocess
from vialinspect.vision.scores import Scores

from .data import image_size, input_shape


class TorchPredictor:
    """PyTorch inference for a batch of same-size containers."""

    def __init__(self, net: Network, spec: InputSpec, device: str = "cpu", has_fill: bool = True):
        self.spec, self.device, self.has_fill = spec, torch.device(device), has_fill
        mm_per_px = (spec.pixel_um or 40.0) / 1000.0
        self.model = InferenceModel(net, mm_per_px).to(self.device).eval()

    @torch.no_grad()
    def predict_prepared(self, batch: list[Prepared]) -> list[Scores]:
        x = torch.from_numpy(np.stack([p.x for p in batch])).to(self.device)
        probs, maps, heights = self.model(x)
        return to_scores(probs.cpu().numpy(), maps.cpu().numpy(), heights.cpu().numpy(), batch, self.has_fill)


def predict_records(predictor, root: Path, records: list[ContainerRecord], batch_size: int = 4,
                    progress: Callable | None = None,
                    on_frames: Callable[[int, list], None] | None = None,
                    fill_gauge: FillGauge | None = None) -> list[Scores]:
    """Scores for every record, in the records' order; batches group containers of one input size.
    ``on_frames(i, frames)`` sees each record's frames as read (e.g. for the out-of-domain guard), so nothing
    reads them twice. With ``fill_gauge`` (a package's or checkpoint's), the gauge's fill-level score replaces
    the network's, as on the station."""
    root = Path(root)
    spec = predictor.spec
    groups: dict[tuple[int, int], list[int]] = {}
    for i, r in enumerate(records):
        groups.setdefault(input_shape(image_size(root, r), spec), []).append(i)
    result: list[Scores | None] = [None] * len(records)
    readings: dict[int, GaugeReading] = {}
    bar = progress(total=len(records)) if progress else None
    for idx in groups.values():
        for j in range(0, len(idx), batch_size):
            chunk = idx[j:j + batch_size]
            prepared = []
            for i in chunk:
                frames = [read_gray(root / f) for f in records[i].frames]
                if on_frames is not None:
                    on_frames(i, frames)
                if fill_gauge is not None:
                    readings[i] = fill_gauge.read(frames)
                prepared.append(preprocess(frames, spec))
            for i, s in zip(chunk, predictor.predict_prepared(prepared), strict=True):
                result[i] = s if fill_gauge is None else apply_reading(s, readings.pop(i))
            if bar:
                bar.update(len(chunk))
    if bar:
        bar.close()
    return result  # type: ignore[return-value]
