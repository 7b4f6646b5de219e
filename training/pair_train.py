"""Training a line's sequence network and its still-image network, paired for cracks (``vision.pair``).

The run directory holds each network's own run (``sequence/`` and ``still/``: their ``best.pt`` and ``last.pt``,
each calibrated on its own) and ``best.pt``, the pair, calibrated on the same validation split. The sequence
network trains first, in ``1 - still_share`` of the time budget; the still network trains on each unit's first
frame in what is left, less the time the pair's calibration is expected to take. ``--resume`` continues the
network that was training when the run stopped (the sequence network is not trained again once the still
network has begun).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from vialinspect.datasets.reader import open_dataset
from vialinspect.export.builtin import is_builtin, resolve_model_ref
from vialinspect.vision.pair import PairNet, network_from_arch, pair_state

from .checkpoint import load_checkpoint, save_checkpoint
from .config import TrainConfig
from .fill_fit import fit_line_gauge

SEQUENCE, STILL = "sequence", "still"
STILL_START = "builtin:still"  # the still-image transfer model (docs/new_line.md)
MIN_STILL_MINUTES = 1.0  # a still network given less than this by the budget still gets it (and the log says so)


def still_network_wanted(data_dir: str | Path, out: Path, cfg: TrainConfig, init: str | None, resume: bool,
                         log: Callable[[str], None]) -> bool:
    """Whether this run trains the pair (``TrainConfig.still_network``); a resumed run is what it was."""
    if resume:
        return (out / SEQUENCE).is_dir()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        log("still_network: not under several processes (torchrun); one sequence network is trained")
        return False
    ds = open_dataset(data_dir)
    frames = cfg.frames or ds.frames_per_container
    if frames <= 1:
        return False
    if cfg.still_network == "on":
        return True
    first_model = init in (None, "auto") or is_builtin(str(init))
    return first_model and not any(r.mask is not None for r in ds.records)


def still_start(cfg: TrainConfig, init: str | None, gauge_fitted: bool) -> str | None:
    """The model the still network starts from (``TrainConfig.still_init``); None: random weights."""
    if cfg.still_init != "auto":
        return cfg.still_init
    if init is None:
        return None
    return STILL_START if gauge_fitted else "builtin:default"


def check_still_init(ref: str) -> None:
    """``TrainingError`` now, before the sequence network's minutes are spent, where ``still_init`` names no model."""
    from .trainer import TrainingError

    if ref == "auto":
        return
    try:
        path = resolve_model_ref(ref)
    except LookupError as e:
        raise TrainingError(f"still_init: {e}") from None
    if not path.exists():
        raise TrainingError(f"still_init: {ref}: no such checkpoint or package")


def train_pair(data_dir: str | Path, out: Path, cfg: TrainConfig, init: str | None, resume: bool,
               log: Callable[[str], None], progress: bool = True) -> dict:
    """Both networks, then the pair in ``out/best.pt`` calibrated on the validation split; returns a summary."""
    from .trainer import _resume_checkpoint, _splits, finalize, has_fill_heights, pick_device, train_network

    t_start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    seq_dir, still_dir = out / SEQUENCE, out / STILL
    if resume:
        # A resumed pair is the run it was, as each network is (train_network): the settings the pair reads itself
        # (the split's false-reject budget, frames, the fill gauge, the still network's share, start and look) and
        # the start it was given come from the sequence network's last.pt, with this call's epochs and time budget.
        # Its recorded config says still_network "off" (one network of the pair); this call's word is kept.
        resumed, run_cfg = _resume_checkpoint(seq_dir / "last.pt", cfg)
        cfg, init = replace(run_cfg, still_network=cfg.still_network), resumed.get("init")
    check_still_init(cfg.still_init)
    budget = cfg.max_minutes
    one = replace(cfg, still_network="off")
    gauge = None
    # The still network's folder is made only once the sequence network is trained and calibrated.
    seq_done = resume and still_dir.is_dir()
    resume_still = seq_done and (still_dir / "last.pt").is_file()
    if seq_done:
        log(f"the sequence network is trained ({seq_dir / 'best.pt'}); "
            + ("resuming the still network" if resume_still else "training the still network"))
        history = load_checkpoint(seq_dir / "best.pt").get("history", [])
        seq = {"stopped": "trained before the resume", "epochs_run": len(history)}
    else:
        log(f"1/2 sequence network -> {seq_dir}" + (f" ({budget * (1 - cfg.still_share):.1f} of {budget:g} min)"
                                                     if budget else ""))
        seq_budget = budget * (1 - cfg.still_share) if budget else None
        seq, gauge = train_network(data_dir, seq_dir, replace(one, max_minutes=seq_budget), init, resume, log,
                                   progress)
    ds = open_dataset(data_dir)
    frames = cfg.frames or ds.frames_per_container
    train_recs, val = _splits(ds, frames, lambda *_: None, cfg.frr)
    if seq_done and cfg.fill_gauge != "off" and not has_fill_heights(train_recs):
        gauge = fit_line_gauge(ds.root, [r for r in train_recs if not r.classes], log)  # as the sequence run did
    # By default the still network starts where a line's still images start (builtin:still, which learnt no fill
    # level across cameras: the fill gauge measures it here) or, without a gauge, from the default model; --init
    # none: from random weights, as the sequence network did.
    still_init = still_start(cfg, init, gauge is not None)
    still_budget = None
    if budget:
        reserve = 1.5 * seq.get("calibration_minutes", 0.0)  # the pair's calibration runs both networks
        still_budget = round(budget - (time.perf_counter() - t_start) / 60 - reserve, 2)
        if still_budget < MIN_STILL_MINUTES:
            log(f"warning: {still_budget:.1f} min of the budget left for the still network; it gets "
                f"{MIN_STILL_MINUTES:g} min (one epoch at least), past the budget")
            still_budget = MIN_STILL_MINUTES
    which = "first frame" if cfg.still_frames == "first" else "frames, one at random a draw"
    log(f"2/2 still network on each unit's {which}, from {still_init or 'random weights'} -> {still_dir}"
        + (f" ({still_budget:.1f} min)" if still_budget else ""))
    # Only the still network's crack score enters the pair, so its synthetic particles keep the sequence
    # network's look (the pair's figures were measured so).
    look = "simulator" if one.implant_look == "auto" else one.implant_look
    still, _ = train_network(data_dir, still_dir, replace(one, frames=1, fill_gauge="off", max_minutes=still_budget,
                                                          implant_look=look), still_init, resume_still, log, progress)
    log("pairing: cracks from the peak of both networks' mean crack map (both must see a crack in the same place); "
        "particles and fill level from the sequence network")
    best = out / "best.pt"
    write_pair(seq_dir / "best.pt", still_dir / "best.pt", best, cfg)
    cal = finalize(best, ds.root, val, cfg, pick_device(cfg.device), log, gauge)
    return {"stopped": f"sequence network: {seq['stopped']}; still network: {still['stopped']}",
            "epochs_run": seq["epochs_run"] + still["epochs_run"],
            "networks": {SEQUENCE: _brief(seq), STILL: _brief(still)}, "calibration": cal,
            "minutes": (time.perf_counter() - t_start) / 60}


def _brief(summary: dict) -> dict:
    return {k: summary[k] for k in ("stopped", "epochs_run", "minutes", "best_value") if k in summary}


def write_pair(sequence_ck: Path, still_ck: Path, out: Path, cfg: TrainConfig) -> None:
    """``out``: a checkpoint of the pair of the two runs' best checkpoints, not yet calibrated (``finalize``)."""
    seq, still = load_checkpoint(sequence_ck), load_checkpoint(still_ck)
    net = PairNet(network_from_arch(seq["model"]), network_from_arch(still["model"]))
    state = pair_state(seq["state_dict"], still["state_dict"])
    net.load_state_dict(state)  # raises here, not in the station, if the two do not make a pair
    keep = ("input_spec", "classes", "dataset", "git_commit", "heads", "init", "history", "epoch", "best_value")
    save_checkpoint(out, {**{k: seq[k] for k in keep if k in seq}, "model": net.arch(), "state_dict": state,
                          "config": {**seq["config"], "still_network": cfg.still_network,
                                     "still_share": cfg.still_share},
                          "networks": {SEQUENCE: {"init": seq.get("init"), "epochs": len(seq.get("history", []))},
                                       STILL: {"init": still.get("init"), "epochs": len(still.get("history", [])),
                                               "history": still.get("history", [])}}})
