"""``vialinspect generate`` (the simulator) and ``vialinspect dataset`` (check, preview, schema)."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from .common import UserError, fraction, positive_int, print_help_of, progress

# ---------------------------------------------------------------- generate

DEFAULT_FRAMES = 4
DEFAULT_PIXEL_UM = 40.0


def cmd_generate(a: argparse.Namespace) -> int:
    from vialinspect.datasets.generate import MAX_PASSES, generate
    from vialinspect.datasets.imagefolder import MAX_SEQUENCE
    from vialinspect.datasets.sim.config import CameraConfig, SimConfig, parse_class_weights, parse_nuisance_rates
    from vialinspect.datasets.sim.formats import FORMATS

    if not 1 <= a.passes <= MAX_PASSES:
        raise UserError(f"--passes must be from 1 to {MAX_PASSES}, got {a.passes}")
    if a.layout == "imagefolder" and a.passes > 1:
        raise UserError("--layout imagefolder holds one acquisition per unit, with image-level labels: --passes "
                        "(a qualification study) needs the manifest layout")
    if a.layout == "imagefolder" and a.frames is not None and a.frames > MAX_SEQUENCE:
        raise UserError(f"--layout imagefolder holds at most {MAX_SEQUENCE} frames per unit (a larger folder reads "
                        f"as a lot of still images), got --frames {a.frames}")
    if a.like is not None and a.pixel_um is not None:
        raise UserError("--like measures the pixel scale on the line's images: give --like or --pixel-um, not both")
    if a.like is not None and a.optics == "varied":
        raise UserError("--like renders through the line's one camera: give --like or --optics varied, not both")

    formats = tuple(f.strip() for f in a.formats.split(",") if f.strip())
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise UserError(f"unknown format(s) {', '.join(unknown) or '(none given)'}; known: {', '.join(FORMATS)}")
    try:
        nuisance = parse_nuisance_rates(a.nuisance or [])
    except ValueError as e:
        raise UserError(f"--nuisance: {e}") from None
    try:
        mix = parse_class_weights(a.defect_mix or [])
    except ValueError as e:
        raise UserError(f"--defect-mix: {e}") from None
    pixel_um = DEFAULT_PIXEL_UM if a.pixel_um is None else a.pixel_um
    cfg = SimConfig(formats=formats, frames=DEFAULT_FRAMES if a.frames is None else a.frames,
                    defect_rate=a.defect_rate, camera=CameraConfig(pixel_um=pixel_um), optics=a.optics)
    look = None
    if a.like is not None:
        out = Path(a.out)
        if out.is_dir() and any(out.iterdir()) and not a.overwrite:  # before the measuring, not after it
            raise UserError(f"{out} is not empty; choose another directory or pass --overwrite")
        look = _fit_look(a.like, formats)
        cfg = look.sim_config(cfg)
        if a.frames is not None:
            cfg = replace(cfg, frames=a.frames)
    if nuisance:
        cfg = cfg.with_nuisance_rates(nuisance)
    if mix:
        cfg = cfg.with_class_weights(mix)
    try:
        cfg.validate()
        stats = generate(Path(a.out), a.containers, cfg, seed=a.seed, workers=a.workers, overwrite=a.overwrite,
                         progress=progress("generate"), passes=a.passes,
                         look=None if look is None else look.to_json(), layout=a.layout)
    except (ValueError, FileExistsError) as e:
        raise UserError(str(e)) from None
    what = f"{stats.containers} containers"
    if stats.passes > 1:
        what += f" ({stats.containers // stats.passes} units x {stats.passes} acquisitions)"
    if stats.folders is not None:
        folders = ", ".join(f"{c} {n}" for c, n in stats.folders.items())
        what += (f" as an ImageFolder ({folders}; {stats.several_classes} with several defect classes, each in the "
                 "folder of the first of particle, crack, fill_level it has)")
    print(f"wrote {what}, {stats.frames} frames to {a.out} in {stats.seconds:.1f} s "
          f"({stats.frames_per_s:.0f} frames/s on {stats.workers} workers)")
    return 0


def _fit_look(folder: str, formats: tuple[str, ...]):
    """The look (``LineLook``) of the line's good units in ``folder``, printed; UserError (one line) when it cannot
    be had. (The room is imported here, not on import: the CLI loads what a command needs.)"""
    from vialinspect.datasets.sim.look import look_of_folder

    try:
        look = look_of_folder(folder, formats=formats)
    except ValueError as e:
        raise UserError(f"--like {e}") from None
    print(f"the line's look, measured on its good units in {folder}:")
    print(look.table())
    for p in look.problems:
        print(f"  note: {p}")
    return look


def add_generate(sub: argparse._SubParsersAction) -> None:
    from vialinspect.datasets.sim.config import NUISANCE_TAGS, OPTICS

    g = sub.add_parser("generate", help="render a simulated dataset of vials and syringes",
                       description="Render back-lit inspection frames of vials and syringes with exact ground truth "
                                   "(defect boxes and masks, fill heights, nuisance tags) and write a dataset.")
    g.add_argument("--out", required=True, help="output directory (must be empty or absent)")
    g.add_argument("--containers", type=positive_int, default=200, help="number of containers (default 200)")
    g.add_argument("--frames", type=positive_int, default=None,
                   help=f"frames per container taken after the spin stops (default {DEFAULT_FRAMES}, or with --like "
                        "the frames per unit of the line's folder; 1 allowed)")
    g.add_argument("--formats", default="vial-2R,vial-10R,syringe-1mL",
                   help="comma-separated container formats (default: vial-2R,vial-10R,syringe-1mL); with --like, "
                        "the formats the line's containers are matched against")
    g.add_argument("--like", metavar="DIR", default=None,
                   help="fit the simulator to a line: measure the look of the good units in DIR (an ImageFolder's "
                        "good/ in any split, a dataset's good rows, or a folder of images, one unit each; 8/16-bit, "
                        "grey or colour): container format, pixel scale, back light, gradient, vignetting, blur, "
                        "read and shot noise, exposure drift, pose jitter and tilt (and flicker from sequences). "
                        "Prints them, renders through that camera and writes them to look.json and the header's "
                        "'look'. Not with --pixel-um or --optics varied")
    g.add_argument("--defect-rate", type=fraction, default=0.5,
                   help="fraction of containers with at least one defect (default 0.5)")
    g.add_argument("--defect-mix", action="append", metavar="CLASS=WEIGHT", default=None,
                   help="relative weight of a defect class among defective containers (default particle=0.5, "
                        "crack=0.25, fill_level=0.25; classes not given keep theirs), e.g. crack=0.45 for a "
                        "crack-rich training lot; repeatable")
    g.add_argument("--pixel-um", type=float, default=None,
                   help=f"camera pixel scale in µm/px (default {DEFAULT_PIXEL_UM:g})")
    g.add_argument("--optics", choices=OPTICS, default="fixed",
                   help="fixed: every container through one camera (--pixel-um); varied: each container through "
                        "its own camera drawn from broad ranges (35-90 µm/px, light, blur, noise, vignetting, "
                        "JPEG), with lot codes and silicone oil on: a pretraining set for new lines "
                        "(default fixed)")
    g.add_argument("--nuisance", action="append", metavar="TAG=RATE", default=None,
                   help="set the chance per container (0..1) of a nuisance, e.g. silicone_oil=0.5 (droplets shed "
                        "by a siliconised barrel) or lot_code=0.5 (inkjet lot code on vials), both off by default; "
                        "repeatable. Tags: " + ", ".join(NUISANCE_TAGS))
    g.add_argument("--passes", type=int, default=1, metavar="N",
                   help="acquire each container N times (1..100) for a qualification study (Knapp, USP <1790>): "
                        "the same physical unit (fill, defects, glass marks) swirled and imaged again, with new "
                        "particle and bubble positions, pose, light and noise; rows c000012_a00 .. with keys unit "
                        "and acquisition, all of a unit in one split (default 1: one plain row per container)")
    g.add_argument("--layout", choices=("manifest", "imagefolder"), default="manifest",
                   help="manifest (default): images/, masks/ and manifest.jsonl with the exact ground truth; "
                        "imagefolder: the same containers as a plant hands them over, image-level labels only and "
                        "no masks: OUT/SPLIT/CLASS/ID.png for one frame, OUT/SPLIT/CLASS/ID/f0.png f1.png ... (a "
                        "folder per unit) for several, CLASS one of good, particle, crack, fill_level, split as "
                        "the manifest's. A unit with several defect classes goes to the folder of the first of "
                        "particle, crack, fill_level it has (the summary counts them). OUT/truth.jsonl keeps each "
                        "unit's defects (class, box, kind, size) for scoring by size. Not with --passes > 1 or "
                        "more than 16 frames")
    g.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives identical images (default 0)")
    g.add_argument("--workers", type=positive_int, default=None, help="worker processes (default: all cores)")
    g.add_argument("--overwrite", action="store_true", help="replace an existing dataset in --out")
    g.set_defaults(func=cmd_generate)


# ---------------------------------------------------------------- dataset check / preview / schema


def _open(path: str, check_files: bool = True):
    from vialinspect.datasets.reader import open_dataset

    return open_dataset(path, check_files=check_files)


def cmd_dataset_check(a: argparse.Namespace) -> int:
    from vialinspect.datasets.reader import decode_check, summarize
    from vialinspect.datasets.readiness import line_advice

    ds = _open(a.path)
    problems = list(ds.problems)
    if not a.quick:
        problems += decode_check(ds, progress=progress("decode"))
    summary = summarize(ds)
    summary["problems"] = len(problems)
    advice = line_advice(ds.records)
    if a.json:
        print(json.dumps({"summary": summary, "problems": [str(p) for p in problems], "advice": advice,
                          "folders_read_as": ds.header.get("folders_read_as", {}),
                          "system_files_skipped": ds.header.get("system_files_skipped", 0)}, indent=2))
    else:
        print(f"{ds.root}: {ds.kind} dataset, {summary['containers']} containers, {summary['frames']} frames")
        if "units" in summary:
            print(f"  {'units':22s} {summary['units']} physical units (rows are acquisitions of them)")
        for key in ("splits", "classes", "nuisances", "formats", "frames_per_container"):
            items = ", ".join(f"{k}={v}" for k, v in sorted(summary[key].items(), key=lambda kv: str(kv[0])))
            print(f"  {key:22s} {items or '-'}")
        print(f"  {'good_with_bubbles':22s} {summary['good_with_bubbles']}")
        if read_as := ds.header.get("folders_read_as"):
            print(f"  {'folders_read_as':22s} " + ", ".join(f"{k}/ = {v}" for k, v in read_as.items()))
        if skipped := ds.header.get("system_files_skipped"):
            print(f"  {'system_files_skipped':22s} {skipped} (hidden files such as .DS_Store and ._*, Thumbs.db, "
                  "desktop.ini: not images)")
        if advice:  # not problems: the data is valid; what it lacks for learning a line
            print("advice for learning a line from these images (counted over the train and val splits, "
                  "which `train` reads):")
            for line in advice:
                print(f"  - {line}")
        if problems:
            print(f"{len(problems)} problem(s):")
            for p in problems[:a.max_problems]:
                print(f"  {p}")
            if len(problems) > a.max_problems:
                print(f"  ... and {len(problems) - a.max_problems} more (--max-problems to see them)")
        else:
            print("no problems found")
    return 1 if problems else 0


def cmd_dataset_preview(a: argparse.Namespace) -> int:
    from vialinspect.datasets.preview import contact_sheet

    ds = _open(a.path)
    try:
        out = contact_sheet(ds, Path(a.out), n=a.count, height=a.tile_height, seed=a.seed)
    except (ValueError, OSError) as e:
        raise UserError(str(e)) from None
    print(f"wrote {out}")
    return 0


def cmd_dataset_schema(a: argparse.Namespace) -> int:
    from vialinspect.datasets.manifest_row import schema_text

    text = schema_text()
    if a.out is None:
        sys.stdout.write(text)
        return 0
    try:
        Path(a.out).write_text(text, encoding="utf-8")
    except OSError as e:
        raise UserError(f"{a.out}: cannot write ({e.strerror})") from None
    print(f"wrote {a.out}")
    return 0


def add_dataset(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser("dataset", help="check or preview a dataset; the manifest row's schema",
                       description="Work with a dataset directory (a manifest dataset or an ImageFolder).")
    dsub = d.add_subparsers(dest="dataset_command", metavar="ACTION")
    c = dsub.add_parser("check", help="validate a dataset and print counts",
                        description="Validate every manifest row and decode every image; print counts per split, "
                                    "class, nuisance and format. For image-level data (an ImageFolder, a manifest "
                                    "without masks) also print advice: what the images lack for learning a line "
                                    "(still images, too few good units, few labelled rejects of a class); advice "
                                    "is not a problem. Exit status 1 if any problem is found.")
    c.add_argument("path", help="dataset directory")
    c.add_argument("--quick", action="store_true", help="check the manifest and file presence only; decode nothing")
    c.add_argument("--json", action="store_true", help="print the summary, problems and advice as JSON")
    c.add_argument("--max-problems", type=positive_int, default=50, help="problems to list (default 50)")
    c.set_defaults(func=cmd_dataset_check)
    v = dsub.add_parser("preview", help="write a contact sheet PNG with annotations drawn",
                        description="Write a contact sheet covering good units, each defect class and each nuisance "
                                    "per container format, with boxes and zoomed crops of annotated objects.")
    v.add_argument("path", help="dataset directory")
    v.add_argument("--out", required=True, help="output image (.png)")
    v.add_argument("--count", type=positive_int, default=16, help="at least this many containers (default 16)")
    v.add_argument("--tile-height", type=positive_int, default=420, help="tile height in pixels (default 420)")
    v.add_argument("--seed", type=int, default=0, help="which examples to pick (default 0)")
    v.set_defaults(func=cmd_dataset_preview)
    sc = dsub.add_parser("schema", help="print the JSON Schema of a manifest row",
                         description="Print (or write) the JSON Schema (draft 2020-12) of one container row of "
                                     "manifest.jsonl, generated from the typed model the readers validate rows "
                                     "with; docs/dataset_schema.json is its output.")
    sc.add_argument("--out", default=None, help="write the schema to this file instead of printing it")
    sc.set_defaults(func=cmd_dataset_schema)
    d.set_defaults(func=print_help_of(d))
