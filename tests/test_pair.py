"""The sequence network paired with a still-image network for cracks (vision/pair.py, training/pair_train.py)."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from tests.conftest import SMALL_WIDTHS, small_config
from vialinspect.datasets.generate import generate
from vialinspect.datasets.sim.config import CameraConfig, SimConfig
from vialinspect.vision.cost import model_gflop
from vialinspect.vision.model import VialNet
from vialinspect.vision.pair import PairNet, adapt_state, mean_probability_logit, network_from_arch

QUIET = dict(progress=False, log=lambda *a: None)


def _pair(frames=3, seed=0):
    torch.manual_seed(seed)
    seq = VialNet(frames, SMALL_WIDTHS, motion=True, contrast=True, branch_width=8, head="separable")
    still = VialNet(1, SMALL_WIDTHS, contrast=True, branch_width=8, head="separable")
    for n in (seq, still):  # away from the map head's prior, so the two networks' cracks differ
        torch.nn.init.normal_(n.map_head[-1].bias, 0.0, 2.0)
    return PairNet(seq, still).eval()


def test_mean_probability_logit_is_exact_and_finite_at_any_logit():
    a = torch.tensor([-3.0, 0.0, 2.5, -100.0, 100.0, -100.0, 40.0], requires_grad=True)
    b = torch.tensor([1.0, 0.0, -4.0, -100.0, 100.0, 100.0, -90.0])
    m = mean_probability_logit(a, b)
    want = (torch.sigmoid(a) + torch.sigmoid(b)) / 2
    assert torch.allclose(torch.sigmoid(m), want, atol=1e-6)
    assert torch.isfinite(m).all()
    assert float(m[3].detach()) == pytest.approx(-100.0, abs=1e-4)  # both sure there is nothing: the mean is too
    assert abs(float(m[5].detach())) < 1e-4  # one sure either way: an even chance
    m.sum().backward()
    assert torch.isfinite(a.grad).all()


def test_pair_takes_particles_and_fill_from_the_sequence_and_its_crack_from_the_peak_of_the_mean_map():
    net = _pair()
    assert net.crack == "map_peak" and net.arch()["crack"] == "map_peak"
    x = torch.randn(2, 3, 96, 64)
    with torch.no_grad():
        cls, maps, rows, ctx = net.forward_features(x)
        s_cls, s_maps, s_rows, s_ctx = net.sequence.forward_features(x)
        t_cls, t_maps, _, _ = net.still.forward_features(x[:, :1])
    for k in (0, 2):
        assert torch.equal(cls[:, k], s_cls[:, k])
        assert torch.equal(maps[:, k], s_maps[:, k])
    assert torch.equal(rows, s_rows) and torch.equal(ctx, s_ctx)
    want_map = (torch.sigmoid(s_maps[:, 1]) + torch.sigmoid(t_maps[:, 1])) / 2
    assert torch.allclose(torch.sigmoid(maps[:, 1]), want_map, atol=1e-6)
    assert torch.allclose(torch.sigmoid(cls[:, 1]), want_map.amax((1, 2)), atol=1e-6)
    # Both networks must see the crack in the same place: never more than the mean of their own peaks.
    peaks = (torch.sigmoid(s_cls[:, 1]) + torch.sigmoid(t_cls[:, 1])) / 2
    assert (torch.sigmoid(cls[:, 1]) <= peaks + 1e-6).all()
    assert not torch.allclose(cls[:, 1], s_cls[:, 1])  # the still network counts
    # The still network sees the first frame only: the others move its crack score not at all.
    y = x.clone()
    y[:, 1:] += 0.5
    with torch.no_grad():
        assert torch.equal(net.still(y[:, :1])[0], t_cls)


def test_pair_peak_of_the_mean_map_is_low_where_the_two_networks_peak_in_different_places():
    seq = VialNet(2, SMALL_WIDTHS, head="separable")
    still = VialNet(1, SMALL_WIDTHS, head="separable")
    net = PairNet(seq, still).eval()
    s_maps = torch.full((1, 3, 4, 4), -8.0)
    t_maps = torch.full((1, 3, 4, 4), -8.0)
    s_maps[0, 1, 0, 0] = 8.0  # the sequence network sees a crack top left
    t_maps[0, 1, 3, 3] = 8.0  # the still network one bottom right
    cls = torch.zeros(1, 3)
    cls[0, 1] = 8.0
    seq.forward_features = lambda x: (cls.clone(), s_maps, torch.zeros(1, 2, 8), torch.zeros(1, 4, 4, 4))
    still.forward_features = lambda x: (cls.clone(), t_maps, torch.zeros(1, 2, 8), torch.zeros(1, 4, 4, 4))
    x = torch.zeros(1, 2, 32, 32)
    assert float(torch.sigmoid(net.forward_features(x)[0][0, 1])) == pytest.approx(0.5, abs=1e-3)
    # The rule of pairs built before 2026-12-07: each network sure of a crack in its own place, so the pair is sure.
    net.crack = "mean"
    assert float(torch.sigmoid(net.forward_features(x)[0][0, 1])) == pytest.approx(1.0, abs=1e-3)
    t_maps[0, 1, 3, 3], t_maps[0, 1, 0, 0] = -8.0, 8.0  # both in the same place
    net.crack = "map_peak"
    assert float(torch.sigmoid(net.forward_features(x)[0][0, 1])) == pytest.approx(1.0, abs=1e-3)


def test_a_pair_recorded_before_the_map_peak_rule_is_rebuilt_with_its_own_rule():
    net = _pair()
    arch = json.loads(json.dumps(net.arch()))
    old = {k: v for k, v in arch.items() if k != "crack"} | {"crack": "mean"}
    again = network_from_arch(old)
    again.load_state_dict(net.state_dict())
    again.eval()
    assert again.crack == "mean" and again.arch()["crack"] == "mean"
    x = torch.randn(2, 3, 96, 64)
    with torch.no_grad():
        cls = again.forward_features(x)[0]
        s_cls = net.sequence.forward_features(x)[0]
        t_cls = net.still.forward_features(x[:, :1])[0]
    want = (torch.sigmoid(s_cls[:, 1]) + torch.sigmoid(t_cls[:, 1])) / 2
    assert torch.allclose(torch.sigmoid(cls[:, 1]), want, atol=1e-6)
    assert network_from_arch(arch).crack == "map_peak"
    with pytest.raises(ValueError, match="unknown crack rule"):
        PairNet(net.sequence, net.still, crack="max")


def test_pair_is_rebuilt_from_its_record_for_another_frame_count_and_costs_both_networks():
    net = _pair(frames=3)
    arch = json.loads(json.dumps(net.arch()))  # as a checkpoint or package stores it
    again = network_from_arch(arch)
    again.load_state_dict(net.state_dict())
    assert isinstance(again, PairNet) and again.frames == 3 and again.still.frames == 1
    five = network_from_arch(arch, frames=5)
    assert five.sequence.frames == 5 and five.still.frames == 1
    state = adapt_state(net.state_dict(), 5)
    five.load_state_dict(state)  # the sequence network's stem and motion branch re-shaped, the still one's kept
    assert torch.equal(state["still.stem.0.weight"], net.state_dict()["still.stem.0.weight"])
    g = model_gflop(net, 3, 128, 64)
    assert g == pytest.approx(model_gflop(net.sequence, 3, 128, 64) + model_gflop(net.still, 1, 128, 64))
    assert network_from_arch(arch, nuisance=True).still.nuisance_head is not None
    with pytest.raises(ValueError, match="one frame"):
        PairNet(net.sequence, net.sequence)


@pytest.fixture(scope="module")
def line_sequences(tmp_path_factory):
    """A line's spin-stop sequences as an ImageFolder (2 frames a unit, image-level labels, no masks)."""
    out = tmp_path_factory.mktemp("line_seq") / "data"
    generate(out, 40, SimConfig(frames=2, defect_rate=0.6, formats=("vial-2R",), camera=CameraConfig(pixel_um=120.0)),
             seed=5, workers=2, layout="imagefolder")
    return out


@pytest.fixture(scope="module")
def pair_run(line_sequences, tmp_path_factory):
    from vialinspect.training.trainer import train

    run = tmp_path_factory.mktemp("pair_run")
    summary = train(line_sequences, run, small_config(epochs=1), init="none", **QUIET)
    return run, summary


def test_train_on_a_lines_sequences_pairs_a_still_network_and_calibrates_the_pair(pair_run, line_sequences):
    from vialinspect.training.checkpoint import build_model, load_checkpoint
    from vialinspect.training.predict import TorchPredictor, predict_records
    from vialinspect.training.trainer import _splits

    run, summary = pair_run
    seq, still, pair = (load_checkpoint(run / p) for p in ("sequence/best.pt", "still/best.pt", "best.pt"))
    assert seq["input_spec"]["frames"] == 2 and still["input_spec"]["frames"] == 1
    assert pair["model"]["arch"] == "VialNetPair" and pair["input_spec"]["frames"] == 2
    assert set(summary["networks"]) == {"sequence", "still"} and summary["epochs_run"] == 2
    assert set(pair["thresholds"]) == {"particle", "crack", "fill_level"}
    assert pair["networks"]["still"]["init"] is None  # --init none: both from random weights
    # Sequences keep the simulator's synthetic particles, in both networks (no_glass is for a line's still images)
    assert seq["config"]["implant_look"] == still["config"]["implant_look"] == "simulator"
    net, spec = build_model(pair)
    assert torch.equal(net.state_dict()["still.stem.0.weight"], still["state_dict"]["stem.0.weight"])
    # The thresholds are the pair's: its crack scores on the validation split, not either network's.
    from vialinspect.datasets.reader import open_dataset

    ds = open_dataset(line_sequences)
    _, val = _splits(ds, 2, lambda *a: None)
    scores = predict_records(TorchPredictor(net, spec), ds.root, val)
    seq_net, _ = build_model(seq)
    alone = predict_records(TorchPredictor(seq_net, spec), ds.root, val)
    assert [s.probs["particle"] for s in scores] == pytest.approx([s.probs["particle"] for s in alone], abs=1e-6)
    assert [s.probs["crack"] for s in scores] != pytest.approx([s.probs["crack"] for s in alone], abs=1e-6)
    assert pair["calibration"]["n_good"] == sum(1 for r in val if not r.classes)


@pytest.fixture(scope="module")
def pair_package(pair_run, line_sequences, tmp_path_factory):
    from vialinspect.export.package import load_package
    from vialinspect.training.export_run import export_model

    out = tmp_path_factory.mktemp("pair_pkg") / "pkg"
    return load_package(export_model(pair_run[0] / "best.pt", out, parity_data=line_sequences,
                                     step=lambda *a: None).path)


def test_the_pair_exports_to_one_graph_that_decides_as_pytorch_does(pair_package, line_sequences, tmp_path, capsys):
    from vialinspect.training.export_run import export_model

    pkg = pair_package
    assert pkg.metadata["architecture"]["arch"] == "VialNetPair"
    assert pkg.metadata["cost"]["gflop_per_container"]["vial-2R"] > 0
    assert pkg.metadata["export"]["parity"]["decisions_identical"]
    # A package's weights re-export (another opset or fp16 later) as a pair too.
    again = export_model(pkg.path, tmp_path / "again", parity_data=line_sequences, step=lambda *a: None)
    assert again.metadata["architecture"]["arch"] == "VialNetPair"
    from vialinspect.cli import main

    assert main(["package", "show", str(pkg.path)]) == 0
    shown = capsys.readouterr().out
    assert "sequence network VialNet (2 frame(s)" in shown
    assert "still network on the first frame VialNet (1 frame(s)" in shown


def test_the_still_network_is_a_lines_first_model_only(line_sequences, coarse_data, tmp_path):
    from vialinspect.training.pair_train import still_network_wanted

    cfg = small_config()
    log = []
    assert still_network_wanted(line_sequences, tmp_path, cfg, "auto", False, log.append)
    assert still_network_wanted(line_sequences, tmp_path, cfg, "builtin:default", False, log.append)
    assert still_network_wanted(line_sequences, tmp_path, cfg, None, False, log.append)
    # Fine-tuning a line's own model keeps its network; data with masks (the simulator's) trains one network.
    assert not still_network_wanted(line_sequences, tmp_path, cfg, str(tmp_path / "pkg"), False, log.append)
    assert not still_network_wanted(coarse_data, tmp_path, cfg, "auto", False, log.append)
    assert still_network_wanted(coarse_data, tmp_path, replace(cfg, still_network="on"), "auto", False, log.append)
    assert not still_network_wanted(line_sequences, tmp_path, replace(cfg, frames=1), "auto", False, log.append)
    # A resumed run is what it was.
    assert not still_network_wanted(line_sequences, tmp_path, cfg, "auto", True, log.append)
    (tmp_path / "sequence").mkdir()
    assert still_network_wanted(coarse_data, tmp_path, cfg, "auto", True, log.append)


def test_the_still_network_can_learn_from_every_frame_and_validates_on_the_first(line_sequences):
    from vialinspect.training.config import TrainConfig
    from vialinspect.training.trainer import Dist, _prepare_data

    said = []
    for setting, train_frames in (("first", {1}), ("any", {2})):
        data = _prepare_data(line_sequences, TrainConfig(frames=1, still_frames=setting), Dist(), torch.device("cpu"),
                             said.append)
        assert {len(r.frames) for r in data.train} == train_frames and {len(r.frames) for r in data.val} == {1}
        assert data.spec.frames == 1
    assert sum("still_frames: any" in line for line in said) == 1


def test_still_network_off_trains_one_network(line_sequences, tmp_path, capsys):
    from vialinspect.cli import main
    from vialinspect.training.checkpoint import load_checkpoint

    cfg = tmp_path / "settings.json"
    cfg.write_text(json.dumps(small_config().to_json()))
    run = tmp_path / "run"
    assert main(["train", "--data", str(line_sequences), "--out", str(run), "--config", str(cfg), "--init", "none",
                 "--epochs", "1", "--still-network", "off"]) == 0
    assert load_checkpoint(run / "best.pt")["model"]["arch"] == "VialNet"
    assert not (run / "sequence").exists()
    assert "still network" not in capsys.readouterr().out


def test_a_pair_resumes_the_still_network_and_fine_tunes_as_a_pair(pair_run, line_sequences, tmp_path):
    import shutil

    from vialinspect.training.checkpoint import load_checkpoint
    from vialinspect.training.trainer import train

    run = tmp_path / "run"
    shutil.copytree(pair_run[0], run)
    log = []
    train(line_sequences, run, small_config(epochs=2), init="none", resume=True, progress=False, log=log.append)
    assert any("resuming the still network" in line for line in log)
    assert len(load_checkpoint(run / "still/last.pt")["history"]) == 2
    assert len(load_checkpoint(run / "sequence/last.pt")["history"]) == 1  # not trained again
    pair = load_checkpoint(run / "best.pt")
    assert len(pair["networks"]["still"]["history"]) == 2
    # Stopped before the still network's first epoch was saved: it starts again, the sequence network stays.
    for f in (run / "still").iterdir():
        f.unlink()
    log = []
    train(line_sequences, run, small_config(epochs=1), init="none", resume=True, progress=False, log=log.append)
    assert any("training the still network" in line for line in log)
    assert len(load_checkpoint(run / "still/last.pt")["history"]) == 1
    assert len(load_checkpoint(run / "sequence/last.pt")["history"]) == 1

    # Fine-tuning from the pair keeps the pair; frozen parts are frozen in both networks.
    ft = tmp_path / "ft"
    log = []
    train(line_sequences, ft, small_config(epochs=1, frozen=("stem", "s2")), init=str(run / "best.pt"),
          progress=False, log=log.append)
    ck = load_checkpoint(ft / "best.pt")
    assert ck["model"]["arch"] == "VialNetPair" and not (ft / "sequence").exists()
    before = load_checkpoint(run / "best.pt")["state_dict"]
    for k in ("sequence.stem.0.weight", "still.stem.0.weight", "still.s2.0.0.weight"):
        assert torch.equal(ck["state_dict"][k], before[k])
    assert not torch.equal(ck["state_dict"]["still.s3.0.0.weight"], before["still.s3.0.0.weight"])
    assert any("frozen" in line and "stem" in line for line in log)


def test_a_resumed_pair_keeps_the_settings_and_start_it_began_with(pair_run, line_sequences, tmp_path):
    import shutil

    from vialinspect.training.checkpoint import load_checkpoint
    from vialinspect.training.trainer import train

    run = tmp_path / "run"
    shutil.copytree(pair_run[0], run)
    before = load_checkpoint(run / "best.pt")
    for f in (run / "still").iterdir():  # stopped before the still network's first epoch was saved
        f.unlink()
    log = []
    # A call with other settings than the run's, and the CLI's default start: the still network begins as the run
    # would have begun it (from random weights: the run was given --init none), on the split the run drew.
    train(line_sequences, run, small_config(epochs=1, frames=1, still_share=0.9, frr=0.2, fill_gauge="off",
                                            still_init="builtin:still"), init="auto", resume=True, log=log.append,
          progress=False)
    assert any("from random weights" in line for line in log), log
    still, pair = load_checkpoint(run / "still/last.pt"), load_checkpoint(run / "best.pt")
    assert still["init"] is None and pair["networks"]["still"]["init"] is None
    assert still["input_spec"]["frames"] == 1 and pair["input_spec"]["frames"] == 2
    for key in ("frames", "still_share", "frr", "fill_gauge", "still_init"):
        assert pair["config"][key] == before["config"][key], key
    assert pair["calibration"]["n_good"] == before["calibration"]["n_good"]
    assert set(pair["thresholds"]) == set(before["thresholds"])


def test_mean_probability_logit_matches_numpy_on_a_grid():
    a, b = np.meshgrid(np.linspace(-20, 20, 41), np.linspace(-20, 20, 41))
    m = mean_probability_logit(torch.tensor(a), torch.tensor(b)).numpy()

    def sig(v):
        return 1 / (1 + np.exp(-v))

    assert np.allclose(sig(m), (sig(a) + sig(b)) / 2, atol=1e-9)


def test_the_station_decides_each_unit_with_the_pair(pair_package, line_sequences, tmp_path):
    from tests.test_station import K, ListSource, RecordingLine, _recipe
    from vialinspect.datasets.imagefolder import read_imagefolder
    from vialinspect.datasets.imageio import read_gray
    from vialinspect.inspection_station.pipeline import ModelSlot, Pipeline
    from vialinspect.inspection_station.station import load_model
    from vialinspect.inspection_station.stats import StationStats
    from vialinspect.inspection_station.store import RecordStore

    units = [r for r in read_imagefolder(line_sequences).records if r.split == "test"][:4]
    frames = {f"u{i}": [read_gray(line_sequences / f) for f in r.frames] for i, r in enumerate(units)}
    assert K == 2 and all(len(f) == K for f in frames.values())
    h, w = next(iter(frames.values()))[0].shape
    script = [(0.0, cid, k, px, None) for cid, fr in frames.items() for k, px in enumerate(fr)]
    model = load_model(pair_package.path, device="cpu", threads=1)
    store = RecordStore(tmp_path / "store", min_free_mb=0.0)
    line = RecordingLine()
    recipe = _recipe(frame_size=[w, h], model=str(pair_package.path), deadline_ms=5000)
    pipe = Pipeline(ListSource(script), recipe, ModelSlot(model), store, line, StationStats(), window_s=1.0,
                    read_timeout_s=0.05)
    pipe.start()
    assert pipe.join(timeout=60)
    rows = {r["container_id"]: r for r in store.iter_decisions()}
    store.close()
    assert set(rows) == set(frames)
    want = model.runner.predict(list(frames.values()))
    for (cid, row), s in zip(sorted(rows.items()), [want[int(c[1:])] for c in sorted(rows)], strict=True):
        assert not any(r.startswith("not_inspected") for r in row["reasons"]), (cid, row["reasons"])
        assert row["model_version"] == pair_package.version_id
        assert row["scores"]["crack"] == pytest.approx(s.probs["crack"], abs=1e-5)


def test_the_still_networks_start_is_a_setting_checked_before_anything_trains(line_sequences, tmp_path, capsys):
    from vialinspect.cli import main
    from vialinspect.training.config import SettingError, TrainConfig
    from vialinspect.training.pair_train import still_start

    auto = TrainConfig()
    assert still_start(auto, "auto", gauge_fitted=True) == "builtin:still"
    assert still_start(auto, "builtin:default", gauge_fitted=False) == "builtin:default"
    assert still_start(auto, None, gauge_fitted=True) is None  # --init none: random weights for both
    narrow = TrainConfig.from_dict({"still_init": "builtin:default"})
    assert still_start(narrow, "auto", gauge_fitted=True) == "builtin:default"
    assert still_start(narrow, None, gauge_fitted=True) == "builtin:default"
    with pytest.raises(SettingError, match="still_init"):
        TrainConfig.from_dict({"still_init": " "})
    for bad, says in (("builtin:nope", "no built-in model 'nope'"), (str(tmp_path / "none.pt"), "no such checkpoint")):
        cfg = tmp_path / "settings.json"
        cfg.write_text(json.dumps({**small_config().to_json(), "still_init": bad}))
        run = tmp_path / "run"
        assert main(["train", "--data", str(line_sequences), "--out", str(run), "--config", str(cfg), "--init",
                     "none", "--epochs", "1", "--still-network", "on"]) != 0
        err = capsys.readouterr()
        assert says in err.out + err.err and "still_init" in err.out + err.err
        assert not (run / "sequence" / "best.pt").exists()  # refused before the sequence network trained


def test_package_show_names_the_pairs_crack_rule():
    from vialinspect.cli.models import network_line

    arch = _pair().arch()
    assert "peak of both networks' mean crack map" in network_line(arch)
    assert "mean of both networks' crack scores" in network_line({**arch, "crack": "mean"})
