"""Training settings: one typed place with defaults that work, loadable from a YAML, TOML or JSON file."""

from __future__ import annotations

import copy
import json
import math
import tomllib
from dataclasses import asdict, dataclass, fields, replace
from functools import cache
from pathlib import Path
from typing import Annotated, Any

from pydantic import BeforeValidator, TypeAdapter, ValidationError

from vialinspect.datasets.implant import IMPLANT_LOOKS
from vialinspect.datasets.records import DEFECT_CLASSES
from vialinspect.datasets.validation import one_line
from vialinspect.errors import VialinspectError
from vialinspect.vision.model import FREEZABLE, MAP_HEADS

from .losses import MIL_POOLS

# What the settings left "auto" (None) become, by the kind of data (TrainConfig.for_data). Data with masks: the
# recipe of the default model. Data without (a line's own images with image-level labels): measured on
# benchmarks/new_line.py's worlds (docs/new_line.md), where the simulator's recipe learnt no particle: the
# synthetic defects drawn into good units are what the maps learn from, so good units are drawn most; a
# balanced map loss lets a 3-pixel particle's few cells count; and the hard negatives teach the map the
# line's bubbles, dust and print that no mask marks.
MASKED_DATA: dict[str, Any] = {"class_draw": {"crack": 3.0, "fill_level": 0.5}, "map_balanced": False,
                               "map_hard_negatives": 0, "monitor": "auroc"}
IMAGE_LEVEL: dict[str, Any] = {"class_draw": {"good": 4.0, "crack": 1.0, "fill_level": 0.5}, "map_balanced": True,
                               "map_hard_negatives": 4, "monitor": "last"}
STILL_FRAMES = ("first", "any")  # the still_frames setting's values


class SettingError(VialinspectError, ValueError):
    """A training setting that cannot be used; ``settings`` names the setting(s), so that ``load_config`` can tell
    whether the value came from the settings file (and name the file) or from a flag."""

    def __init__(self, settings: str | tuple[str, ...], message: str) -> None:
        super().__init__(message)
        self.settings = (settings,) if isinstance(settings, str) else tuple(settings)


# Settings files are checked with pydantic's lax mode (TrainConfig.from_dict): a number written as text is that
# number, because YAML 1.1 (PyYAML) reads an exponent without a dot, ``lr: 1e-3``, as the text '1e-3'; and
# ``epochs: "3"`` is 3. A whole-number setting takes no fraction, though: ``batch_size: 2.5`` (or 2.0) is refused,
# not rounded, and neither number kind takes true/false.
def _whole(v: Any) -> Any:
    if isinstance(v, bool | float) or (isinstance(v, str) and not v.strip().lstrip("+-").isdigit()):
        raise ValueError("must be a whole number")
    return v


def _number(v: Any) -> Any:
    if isinstance(v, bool):
        raise ValueError("must be a number")
    return v


def _bad(setting: str, problem: str) -> SettingError:
    return SettingError(setting, f"{setting} {problem}")


Int = Annotated[int, BeforeValidator(_whole)]  # an int setting as pydantic checks it
Float = Annotated[float, BeforeValidator(_number)]


@dataclass
class TrainConfig:
    epochs: Int = 30
    batch_size: Int = 4
    lr: Float = 5e-4
    weight_decay: Float = 1e-4
    patience: Int = 6  # epochs without a better validation result (see monitor) before stopping early
    # What "better on validation" means for best.pt and early stopping: "auroc", the mean AUROC of the classes
    # the network's probabilities decide (particle, crack; fill level too where no fill height is measured);
    # "loss", the validation loss (dominated by the maps and fill rows, it can fall while detection does not);
    # or "last": no choosing and no early stop, best.pt is the last epoch (the end of the schedule, which a time
    # budget anneals to). None ("auto"): "auroc" for data with masks; "last" for a line's own images, whose
    # validation split of a few labelled units cannot rank epochs (a few units' AUROCs saturate near 1.00 or swing
    # by 0.05-0.3: chosen by them, runs kept an early epoch and stopped at a third to two thirds of the budget;
    # keeping the last found more particles or cracks in each of five runs; docs/new_line.md, "Which epoch a
    # line's run keeps").
    monitor: str | None = None
    frames: Int | None = None  # frames per container; default: the dataset's
    device: str = "auto"  # auto | cpu | cuda
    # Data-loading processes. Default: none on the CPU, where the training step already uses every core (a
    # loader process beside it made a 2-core step ~40% slower); up to 4 on CUDA.
    workers: Int | None = None
    # Decoded training and validation images kept in memory for the next epochs (shared by the splits' sizes
    # and split between the workers); capped at a quarter of the machine's memory. 0 turns it off.
    cache_gb: Float = 4.0
    threads: Int | None = None  # torch intra-op threads on the CPU (default: all cores)
    seed: Int = 0
    frr: Float = 0.01  # false-reject budget for calibrating thresholds on the validation split
    # The network's channels per stage (1/2 ... 1/32), and with the two settings below what a container costs:
    # 0.95 GFLOP for a vial-2R container at 4 frames with these defaults (the default model's network since
    # 2026-12-04); the earlier default's network, widths (16, 24, 32, 48, 64), branch_width 16 and map_head
    # "dense", costs 2.42 and finds as much in fewer epochs (docs/model_and_training.md, "What a container costs").
    widths: tuple[Int, ...] = (10, 16, 24, 32, 48)
    # Channels of the motion and contrast branches.
    branch_width: Int = 8
    # The class maps' head: "dense" (one 3x3 convolution over every context channel) or "separable" (3x3 per
    # channel, then a 1x1 mix: a seventh of the cost).
    map_head: str = "separable"
    # A nuisance head (vision.model.NuisanceHead): learned suppression of the particle and crack maps, for
    # retraining from reviewed false rejects (measured, not kept: docs/retraining.md). Fine-tuning adds it to an
    # initial model that has none, at its prior (0.018 off a logit); an initial model that has one keeps it.
    nuisance_head: bool = False
    # The network's motion branch (vision.model.MotionBranch: which way objects move between frames, over the
    # swirl's reach); K >= 2 only. Fine-tuning (--init) keeps the initial model's network either way.
    motion_branch: bool = True
    # The network's contrast branch (vision.model.ContrastBranch: the mean frame against its local background,
    # so a crack in a dark band looks as it does on the bright body).
    contrast_branch: bool = True
    max_side: Int = 1792
    samples_per_epoch: Int | None = None  # default: the size of the training split
    balance: bool = True  # class-balanced sampling
    # With balance: relative draw shares per class ("good", "particle", "crack", "fill_level"; 1 where not
    # given; {} draws the four alike). Cracks are what the network learns last: drawn alike, a 30-minute CPU
    # run may end before it has (validation crack AUROC 0.6 in one of two runs); twice as often, it had by
    # epoch 6, three times as often by epoch 4; the fill level (learnt in 2-3 epochs, from every container's
    # fill rows) is drawn half as often (docs/model_history.md).
    # None ("auto"): {crack: 3, fill_level: 0.5} for data with masks; for a line's own images without masks,
    # good units (which carry the synthetic defects) four times as often and cracks alike (IMAGE_LEVEL).
    class_draw: dict[str, Float] | None = None
    augment: bool = True
    # Mixed precision: float16 on CUDA; bfloat16 on CPUs that compute it natively (AVX512-BF16 or AMX; 1.5x
    # faster steps on this project's 2-core machine), else off. Validation, calibration and export stay fp32.
    amp: bool = True
    # Time budget of the whole run, from reading the data to the calibrated best checkpoint: it ends after the
    # last epoch that, at the slowest pace so far, leaves time for no other (at least one; the best is kept).
    max_minutes: Float | None = None
    map_pos_weight: Float = 10.0  # weight of a defect cell against a background cell in the map loss
    # Instead: each class's defect cells and background cells averaged apart. None ("auto"): off for data with
    # masks (the default model's recipe), on for data without (IMAGE_LEVEL).
    map_balanced: bool | None = None
    # Each item's N worst background cells per class count again (losses.map_loss). None ("auto"): 0 for data
    # with masks, IMAGE_LEVEL's for data without.
    map_hard_negatives: Int | None = None
    # Weight of that hard-negative term against the background mean and the defect cells' mean (1: alike). At 4 on
    # a foreign line's still images the line's own bubbles fell, unseen ones did not (docs/new_line.md): not adopted.
    map_hard_negative_weight: Float = 1.0
    # The share of good training units that, scored highest on any defect when last drawn, are drawn
    # ``hard_good_weight`` times as often as the other good units (training.hard_goods; the good units' total
    # share stays as class_draw says). 0 = off. A resumed run starts its scores afresh. At 0.1 and 4: +0.008 on
    # average over two lines, within a run's spread (docs/new_line.md): not adopted.
    hard_good_top: Float = 0.0
    hard_good_weight: Float = 3.0
    # How a labelled reject without a mask (image-level label) reaches its class maps in the loss: "max", its map's
    # peak (the logit inference uses); "soft", the peak shared with the map's next highest cells (losses.soft_peak),
    # so that a faint particle beside a brighter bubble also gets a share of the push. "soft" found fewer particles
    # on a foreign line's still images (0.34 against 0.46; docs/new_line.md): not adopted.
    mil_pool: str = "max"
    # Weight of a background cell inside a nuisance object's box (bubble, droplet, glass mark): the hard
    # negatives a good unit must pass with. 1 = an ordinary background cell.
    map_nuisance_weight: Float = 1.0
    # Cracks shorter than this (mm, where the data gives lengths) are left out of the losses: neither defect
    # nor background. A crack of 0.5-1 mm is a short dark static mark, as a droplet on the glass is; taught as
    # cracks, they may teach the network that droplets are cracks. Validation and evaluation still count them.
    # 0 = off (the default model's recipe); 1.0 was measured once, with other widths (docs/model_history.md).
    crack_min_mm: Float = 0.0
    anneal_to_budget: bool = False  # under max_minutes, end the cosine decay with the budget, not the epochs
    # Fine-tuning only: weight of a loss that keeps the class maps close to those of the --init model (the
    # teacher) on the training containers that do not say ``"distill": false``, so that what new data does
    # not speak to is not forgotten ("learning without forgetting"). 0 = off.
    distill: Float = 0.0
    # Fine-tuning only: parts of the network that keep the --init model's weights and batch-norm statistics
    # (names of VialNet's parts: FREEZABLE), so that what the new data teaches goes into the rest.
    frozen: tuple[str, ...] = ()
    # Share of drawn containers used whole; the rest become crops (needs masks). Crops carry most of what the
    # particle and crack maps learn at a fraction of the cost; the fill rows learn from few whole images.
    p_full: Float = 0.2
    crop: Int = 256  # crop side in pixels (a multiple of 32)
    crop_batch: Int = 8
    crops_per_full: Int = 4
    loss_weights: tuple[Float, Float, Float] = (1.0, 1.0, 1.0)  # class, map, fill rows
    # Data without masks (an ImageFolder, a plant's own images): the share of drawn good units that get a
    # synthetic particle, fibre or crack with its exact mask (datasets/implant.py), so the maps learn where a
    # defect is from the line's own background. 0 = off. Only good units from a line's camera are drawn into
    # (an ImageFolder's, a reviewed false reject's), never the simulator's: `make model`'s data has none.
    implant: Float = 0.8
    # Size range of the synthetic particles (largest dimension, log-uniform) where the pixel scale is known.
    implant_particle_um: tuple[Float, Float] = (150.0, 900.0)
    # The look of the synthetic particles (datasets/implant.py IMPLANT_LOOKS): "simulator" (the simulator's
    # kinds), "varied" (also thick and short fibres and thin glass flakes), "no_glass" (without the simulator's
    # glass particle, which looks like a bubble in a still image), or "auto": "no_glass" for a line's still images
    # (one image a unit, no masks), "simulator" otherwise (a sequence tells a glass particle from a bubble by how
    # it moves; the pair's still network gives only its crack score). "varied" had no consistent effect on still
    # images (+0.08, +0.11, -0.16 in particles against same-day runs); "no_glass" against the simulator's look on
    # still images: docs/new_line.md, "Particles in still images".
    implant_look: str = "auto"
    # Chance that a drawn good unit from a line's camera also gets a scratch on the glass (a smooth thin arc) as
    # a known-clean nuisance, so the crack map learns a scratch is not a crack. Off: measured once on two lines
    # (docs/new_line.md), not adopted.
    implant_scratches: Float = 0.0
    # Chance that a drawn good unit from a line's camera also gets one to three gas bubbles (the simulator's
    # sprite, 0.1-1.2 mm) as known-clean nuisances, so the particle map learns a bubble it has not seen on the line
    # is not a particle. Off: at 0.5 on a foreign line's still images particles +0.015, AUROC +0.010
    # (docs/new_line.md, "Particles in still images"): not adopted. On spin-stop sequences at 0.5: fx68 particle /
    # crack +0.045 / -0.030, w72 -0.045 / -0.075 ("What sets the crack threshold"): not adopted.
    implant_bubbles: Float = 0.0
    # Spin-stop sequences: the share of the synthetic particles that lie on the vial's floor and barely move (a
    # dense particle settled before the frames), placed by the container's classical geometry; vials only. Off:
    # at 0.3 on one line particles fell 0.91 -> 0.85, the network calling still bubbles and dust particles too
    # (docs/new_line.md), not adopted.
    implant_resting: Float = 0.0
    # Spin-stop sequences: each synthetic particle turns by a rate drawn within +-this many radians a frame, as a
    # particle tumbles in the turning liquid (the simulator's objects tumble at up to 6 rad/s, 0.24 rad a frame at
    # its 25 frames/s), where a mark on the glass keeps its look. 0: the particle keeps its pose in every frame.
    # Off: at 0.25 particles +0.03 on fx68 and -0.03 on the held-out fx61, the particle AUROC down on both
    # (docs/new_line.md, "Tumbling synthetic particles"), not adopted.
    implant_tumble: Float = 0.0
    # Data without masks: the share of the synthetic cracks drawn at the container's two ends (a vial's heel, its
    # shoulder and neck; a syringe's flange end and cone: datasets/implant.py glass_ends), where handling and
    # capping crack a container, instead of anywhere lit (which puts ~7% of them in a vial's heel rows). 0 = off.
    # Off: at 0.5 on w65's sequences cracks fell 0.910 -> 0.881, its heel cracks found as before (docs/new_line.md,
    # "What sets the crack threshold"), not adopted.
    implant_crack_ends: Float = 0.0
    # Data without masks: the local light a synthetic crack needs, as a share of the image's bright level (the
    # particles' 0.4 by default). Lower, cracks also land on grey glass (a syringe's flange, a vial's heel band),
    # where a line's missed flange cracks were seen. 0.4: at 0.15 fx66s found its flange cracks 2 of 7 as before,
    # cracks 0.836 as before (docs/new_line.md, "Three more ways at the crack threshold"), not adopted.
    implant_crack_light: Float = 0.4
    # Data without masks: draw the synthetic defects only within the container's outline (datasets/implant.py
    # container_outline), not on the empty back light beside and above it, where 13-47% of them lay on the lines
    # measured. Off: w65 0.985 / 0.896 against 0.985 / 0.910, w72 0.806 / 0.836 against 0.881 / 0.851
    # (docs/new_line.md, "Synthetic defects only within the container"), not adopted.
    implant_inside: bool = False
    # Data without masks: also validate on copies of the validation split's good units from the line's camera with
    # synthetic particles, fibres or cracks drawn in (the same draw every epoch), so that best.pt and early
    # stopping see particles and cracks where the labelled split holds few or none (a 50-label line's split held
    # no crack; a 200-label line's 3 to 10). Off: one run each on three lines (docs/new_line.md), mixed; where the
    # split held a few fill-level units their network AUROC, not the synthetic units, still chose best.pt. Under
    # monitor "last" (the default for such data since) it chooses nothing and only adds figures to the log.
    synthetic_val: bool = False
    # Weight of the image-level loss of a particle or crack known only from its image's label (no mask): it
    # acts on the class map's peak, wherever that is. Measured at 0 (synthetic defects alone teach the maps)
    # it did not help, and the fill level then learnt less (docs/new_line.md); 1 keeps what the labels say.
    image_label_weight: Float = 1.0
    # Validate every N epochs (and always after the last, also when the time budget ends the run): validation
    # is ~15% of an epoch on the CPU, and every other epoch gives a 30-minute run one more epoch.
    val_every: Int = 2
    # Fill level of data without fill heights (an ImageFolder): "auto" fits the fill gauge (vision/fill_gauge.py:
    # the liquid column measured classically, against the training split's good units of the same container
    # geometry) and lets it decide the fill level unless the network's own fill-level output separates the
    # validation split clearly better; "on" always where the gauge can be fitted, "off" never. Data with fill
    # heights (the simulator's) learns the fill height itself and never uses the gauge.
    fill_gauge: str = "auto"
    # A line's spin-stop sequences (several frames a unit) with image-level labels: also train a still-image
    # network on each unit's first frame, after the sequence network and from the still-image transfer model,
    # and average the two networks' crack probabilities (vision/pair.py). Measured as built on five lines (20
    # minutes, 200 labels): against its own sequence network, cracks +0.03 to +0.16 at <= 2% false rejects on four,
    # -0.03 on one, particles unchanged; 2.8 GFLOP a vial-2R container against 0.95 (docs/new_line.md). "auto": for
    # such data when training starts from a shipped
    # model or from random weights (a line's first model; fine-tuning a line's own model keeps its network);
    # "on": for any multi-frame data; "off": never.
    still_network: str = "auto"
    # The share of max_minutes the still network gets (the sequence network trains first, in the rest).
    still_share: Float = 0.5
    # Which frames of a line's spin-stop units the still network learns from: "first" (frame 0, the frame it is
    # given in the pair) or "any" (each time a training unit is drawn, one of its frames at random: K views of its
    # bubbles and particles, each elsewhere, at no extra labels or time; validation and the pair keep frame 0;
    # data without masks only, as a mask covers all the frames). Default "first": "any" found fewer cracks on w65's
    # sequences (0.910 -> 0.866 at 2% false rejects; docs/new_line.md, "Three more ways at the crack threshold").
    still_frames: str = "first"
    # Where the still network starts: "auto" (the still-image transfer model builtin:still where the fill gauge
    # measures the fill level, else builtin:default; random weights with --init none), or a model as --init takes
    # it (builtin:NAME, a checkpoint or a package). builtin:default is the narrower network: less compute per
    # container (docs/new_line.md).
    still_init: str = "auto"

    def for_data(self, has_mask: bool, frames: int = 1) -> TrainConfig:
        """These settings with every "auto" (None) setting resolved for the data: with masks (the simulator's)
        or without (a line's own images, labelled per image), of ``frames`` images a unit."""
        auto = MASKED_DATA if has_mask else IMAGE_LEVEL
        cfg = replace(self, **{k: copy.deepcopy(v) for k, v in auto.items() if getattr(self, k) is None})
        if cfg.implant_look == "auto":
            cfg = replace(cfg, implant_look="no_glass" if not has_mask and frames == 1 else "simulator")
        return cfg

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Settings from parsed data: unknown names refused, types checked (lax for numbers written as text, see
        ``_whole``), then ranges (``validate``). Raises ``SettingError``, one line naming the setting(s)."""
        names = [f.name for f in fields(cls)]
        unknown = sorted(str(k) for k in d if k not in names)
        if unknown:
            raise SettingError(tuple(unknown), f"unknown training setting(s): {', '.join(unknown)}; "
                                                f"known: {', '.join(names)}")
        try:
            cfg = _adapter().validate_python(d)
        except ValidationError as e:
            raise SettingError(tuple(str(err["loc"][0]) for err in e.errors() if err["loc"]), one_line(e)) from None
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Ranges and choices, after the types are checked (``from_dict``); raises ``SettingError``."""
        for k in ("epochs", "batch_size"):
            if getattr(self, k) < 1:
                raise _bad(k, f"must be >= 1, got {getattr(self, k)}")
        if not 0 < self.frr < 1:
            raise _bad("frr", f"must be within (0, 1), got {self.frr}")
        if self.monitor not in (None, "auroc", "loss", "last"):
            raise _bad("monitor", f"must be auroc, loss or last, got {self.monitor!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise _bad("device", f"must be auto, cpu or cuda, got {self.device!r}")
        if len(self.widths) != 5 or min(self.widths) < 1:
            raise _bad("widths", f"must be 5 channel counts >= 1 (stages 1/2 to 1/32), got {list(self.widths)}")
        if self.branch_width < 1:
            raise _bad("branch_width", f"must be >= 1, got {self.branch_width}")
        if self.map_head not in MAP_HEADS:
            raise _bad("map_head", f"must be {' or '.join(MAP_HEADS)}, got {self.map_head!r}")
        if not set(self.frozen) <= set(FREEZABLE):
            raise _bad("frozen", f"must name parts of the network ({', '.join(FREEZABLE)}), got {list(self.frozen)}")
        if self.crop < 32 or self.crop % 32:
            raise _bad("crop", f"must be a multiple of 32, got {self.crop}")
        if not 0 <= self.p_full <= 1:
            raise _bad("p_full", f"must be within 0..1, got {self.p_full}")
        if self.workers is not None and self.workers < 0:
            raise _bad("workers", f"must be >= 0, got {self.workers}")
        if not (self.distill >= 0 and math.isfinite(self.distill)):
            raise _bad("distill", f"must be a finite weight >= 0, got {self.distill}")
        if not (self.map_nuisance_weight > 0 and math.isfinite(self.map_nuisance_weight)):
            raise _bad("map_nuisance_weight", f"must be a finite weight > 0, got {self.map_nuisance_weight}")
        if not (self.crack_min_mm >= 0 and math.isfinite(self.crack_min_mm)):
            raise _bad("crack_min_mm", f"must be a finite length >= 0, got {self.crack_min_mm}")
        if self.cache_gb < 0:
            raise _bad("cache_gb", f"must be >= 0, got {self.cache_gb}")
        known = ("good", *DEFECT_CLASSES)  # the keys class_weights draws by
        draw = {} if self.class_draw is None else self.class_draw
        shares_ok = isinstance(draw, dict) and not set(draw) - set(known) and all(
            isinstance(v, int | float) and 0 <= v < math.inf for v in draw.values())
        if not shares_ok or (draw and not any(draw.get(k, 1.0) > 0 for k in known)):
            raise _bad("class_draw", f"must map some of {', '.join(known)} to finite shares >= 0, not all 0; "
                                     f"got {self.class_draw!r}")
        if not 0 <= self.implant <= 1:
            raise _bad("implant", f"must be within 0..1, got {self.implant}")
        if self.implant_look not in ("auto", *IMPLANT_LOOKS):
            raise _bad("implant_look", f"must be auto or one of {', '.join(IMPLANT_LOOKS)}, got {self.implant_look!r}")
        if not 0 <= self.implant_bubbles <= 1:
            raise _bad("implant_bubbles", f"must be within 0..1, got {self.implant_bubbles}")
        if not 0 <= self.implant_scratches <= 1:
            raise _bad("implant_scratches", f"must be within 0..1, got {self.implant_scratches}")
        if not 0 <= self.implant_resting <= 1:
            raise _bad("implant_resting", f"must be within 0..1, got {self.implant_resting}")
        if not 0 < self.implant_crack_light <= 1:
            raise _bad("implant_crack_light", f"must be within (0, 1], got {self.implant_crack_light}")
        if not 0 <= self.implant_crack_ends <= 1:
            raise _bad("implant_crack_ends", f"must be within 0..1, got {self.implant_crack_ends}")
        if not 0 <= self.implant_tumble <= 3.15:
            raise _bad("implant_tumble", f"must be within 0..3.15 (radians a frame), got {self.implant_tumble}")
        lo, hi = self.implant_particle_um
        if not 0 < lo <= hi:
            raise _bad("implant_particle_um", f"must be [low, high] with 0 < low <= high, got "
                                              f"{list(self.implant_particle_um)}")
        if not 0 <= self.image_label_weight <= 1:
            raise _bad("image_label_weight", f"must be within 0..1, got {self.image_label_weight}")
        if self.map_hard_negative_weight < 0:
            raise _bad("map_hard_negative_weight", f"must be >= 0, got {self.map_hard_negative_weight}")
        if not 0 <= self.hard_good_top <= 1:
            raise _bad("hard_good_top", f"must be within 0..1, got {self.hard_good_top}")
        if not (1 <= self.hard_good_weight < math.inf):
            raise _bad("hard_good_weight", f"must be a finite factor >= 1, got {self.hard_good_weight}")
        if self.mil_pool not in MIL_POOLS:
            raise _bad("mil_pool", f"must be one of {', '.join(MIL_POOLS)}, got {self.mil_pool!r}")
        if self.map_hard_negatives is not None and self.map_hard_negatives < 0:
            raise _bad("map_hard_negatives", f"must be >= 0, got {self.map_hard_negatives}")
        if self.fill_gauge not in ("auto", "on", "off"):
            raise _bad("fill_gauge", f"must be auto, on or off, got {self.fill_gauge!r}")
        if self.still_network not in ("auto", "on", "off"):
            raise _bad("still_network", f"must be auto, on or off, got {self.still_network!r}")
        if self.still_frames not in STILL_FRAMES:
            raise _bad("still_frames", f"must be one of {', '.join(STILL_FRAMES)}, got {self.still_frames!r}")
        if not 0 < self.still_share < 1:
            raise _bad("still_share", f"must be within (0, 1), got {self.still_share}")
        if not isinstance(self.still_init, str) or not self.still_init.strip():
            raise _bad("still_init", f"must be auto or a model (builtin:NAME, a checkpoint or a package), got "
                                     f"{self.still_init!r}")
        if self.val_every < 1:
            raise _bad("val_every", f"must be >= 1, got {self.val_every}")
        if self.frames is not None and self.frames < 1:
            raise _bad("frames", f"must be >= 1, got {self.frames}")


def load_config(path: str | Path | None, overrides: dict[str, Any],
                defaults: dict[str, Any] | None = None) -> TrainConfig:
    """Defaults (the class's, then ``defaults``), then the file (if any), then overrides actually given.

    Raises ``ValueError`` in one line; a mistake in the file's settings names the file."""
    from_file: dict[str, Any] = {}
    if path:
        p = Path(path)
        from_file = _read_settings_file(p)
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        return TrainConfig.from_dict({**(defaults or {}), **from_file, **given})
    except SettingError as e:
        if path and any(k in from_file and k not in given for k in e.settings):
            raise SettingError(e.settings, f"{path}: {e}") from None
        raise


def _read_settings_file(p: Path) -> dict[str, Any]:
    if not p.is_file():
        raise ValueError(f"{p}: config file not found")
    text = p.read_text()
    try:
        if p.suffix in (".yaml", ".yml"):
            import yaml

            d = yaml.safe_load(text) or {}
        elif p.suffix == ".toml":
            d = tomllib.loads(text)
        else:
            d = json.loads(text)
    except Exception as e:  # noqa: BLE001 - any parse error is the user's file, reported as such
        raise ValueError(f"{p}: cannot parse config ({' '.join(str(e).split())})") from None
    if isinstance(d, dict) and "train" in d:  # the settings may sit in a train section
        d = d["train"]
    if not isinstance(d, dict):
        raise ValueError(f"{p}: config must be a mapping of setting: value")
    return dict(d)


@cache
def _adapter() -> TypeAdapter[TrainConfig]:
    return TypeAdapter(TrainConfig)
