"""`make demo`: the whole product on a small embedded default, step by step.

Simulate a small dataset, validate it, write an annotated contact sheet, evaluate the committed default
model on it, run the inspection station on the simulator as a camera with that model, then learn a new line
from its own images (a line the default model never saw, handed over as an ImageFolder of spin-stop sequences
with image-level labels: check it, fit the simulator to it, train on it within a budget, evaluate on its test
split), and end with the QA review app serving the station's flagged units (a demo reviewer login is printed).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from .cli import main as cli

# Shipped with the package, so the demo runs from an installed wheel as from a checkout.
MODEL = "builtin:default"
RECIPE = "vial-2R"
NEW_LINE_CONTAINERS = 240
NEW_LINE_MINUTES = 3.0


def new_line_steps(out: Path, containers: int = NEW_LINE_CONTAINERS,
                   minutes: float = NEW_LINE_MINUTES) -> list[tuple[str, list[str]]]:
    """Bring your own line (docs/new_line.md), on a line simulated for it: 60 µm/px, which the default model was
    not trained at, handed over as a plant would, an ImageFolder of spin-stop sequences (4 frames per unit) with
    image-level labels and train/val/test split folders. ``train`` reads train and val only; the test split is
    what it never saw, and what ``evaluate`` scores, with the package's thresholds calibrated on a lot of the
    line's good units and a good-only anomaly model fitted on them, as docs/new_line.md's walk does."""
    line, sim, run_dir = out / "new_line", out / "new_line_sim", out / "new_line_run"
    model, good, calibrated = out / "new_line_model", out / "new_line_good", out / "new_line_model_calibrated"
    watched = out / "new_line_model_anomaly"
    return [
        ("a new line's own images (60 µm/px, which the default model never saw), handed over as an ImageFolder "
         "of spin-stop sequences with image-level labels",
         ["generate", "--layout", "imagefolder", "--out", str(line), "--containers", str(containers), "--frames",
          "4", "--formats", "vial-2R", "--pixel-um", "60", "--seed", "11", "--overwrite"]),
        ("check the line's ImageFolder", ["dataset", "check", str(line)]),
        ("the simulator fitted to the line (its measured look)",
         ["generate", "--like", str(line), "--out", str(sim), "--containers", "24", "--seed", "12", "--overwrite"]),
        (f"learn the line from its image-level labels ({minutes:g} min budget)",
         ["train", "--data", str(line), "--out", str(run_dir), "--max-minutes", f"{minutes:g}"]),
        ("export the line's model as a verified package",
         ["export", "--checkpoint", str(run_dir / "best.pt"), "--out", str(model), "--overwrite"]),
        ("a lot of the line's accepted units (what a plant has thousands of)",
         ["generate", "--layout", "imagefolder", "--out", str(good), "--containers", "300", "--frames", "4",
          "--formats", "vial-2R", "--pixel-um", "60", "--defect-rate", "0", "--seed", "13", "--overwrite"]),
        ("calibrate the package's thresholds on them (the validation split's few good units cannot hold 1%)",
         ["package", "calibrate", str(model), "--data", str(good), "--out", str(calibrated), "--reason",
          "the line's accepted units", "--overwrite"]),
        ("a good-only anomaly model of the line on the same good units (reason 'anomaly': what no one labelled)",
         ["package", "fit-anomaly", str(calibrated), "--data", str(good), "--out", str(watched), "--reason",
          "the line's accepted units", "--overwrite"]),
        ("evaluate the package on the line's test split, which training never saw",
         ["evaluate", "--model", str(watched), "--data", str(line), "--split", "test", "--out",
          str(out / "new_line_report")]),
    ]


def run(out: Path, containers: int = 120, station_units: int = 300, review: bool = True, port: int = 7860,
        new_line: bool = True, new_line_containers: int = NEW_LINE_CONTAINERS,
        new_line_minutes: float = NEW_LINE_MINUTES) -> int:
    data = out / "data"
    steps = [
        ("simulate a dataset", ["generate", "--out", str(data), "--containers", str(containers), "--frames", "4",
                                "--seed", "7", "--overwrite"]),
        ("validate it", ["dataset", "check", str(data)]),
        ("contact sheet", ["dataset", "preview", str(data), "--out", str(out / "contact_sheet.png")]),
        ("evaluate the default model", ["evaluate", "--model", str(MODEL), "--data", str(data), "--out",
                                        str(out / "report"), "--split", "all"]),
        ("inspection station on the simulated line", [
            "station", "--recipe", str(RECIPE), "--source", "sim://?rate=1200&seed=7", "--store",
            str(out / "station_store"), "--max-containers", str(station_units)]),
    ]
    if new_line:
        steps += new_line_steps(out, new_line_containers, new_line_minutes)
    shutil.rmtree(out / "station_store", ignore_errors=True)  # a fresh line run each time
    shutil.rmtree(out / "new_line_run", ignore_errors=True)  # a fresh training run, not a resumed one
    for i, (title, argv) in enumerate(steps, 1):
        print(f"\n== demo step {i}/{len(steps)}: {title}: vialinspect {' '.join(argv)}", flush=True)
        rc = cli(argv)
        if rc != 0:
            print(f"demo stopped: step {i} failed (exit {rc})", file=sys.stderr)
            return rc
    print(f"\ndemo done: dataset {data}, contact sheet {out / 'contact_sheet.png'}, report {out / 'report'}, "
          f"station records {out / 'station_store'}")
    if new_line:
        print(f"new line: its images {out / 'new_line'}, the simulator fitted to it {out / 'new_line_sim'}, its "
              f"model {out / 'new_line_model_anomaly'}, its report {out / 'new_line_report'} (a "
              f"{new_line_minutes:g}-minute run on {new_line_containers} units: docs/new_line.md has what 10 minutes "
              "and 800 units give)")
    if review:
        return serve_review(out / "station_store", port)
    return 0


DEMO_USER, DEMO_PASSWORD = "qa.demo", "demo-password-1"


def serve_review(store: Path, port: int) -> int:
    """The review app on the demo store, with a demo reviewer (demo only: never a fixed password on a line)."""
    from vialinspect.inspection_station.qa.audit import ReviewDB
    from vialinspect.inspection_station.qa.review_app import serve
    from vialinspect.inspection_station.qa.users import add_user, get_user

    db = ReviewDB(store)
    if get_user(db, DEMO_USER) is None:
        add_user(db, DEMO_USER, "Demo Reviewer", "reviewer", DEMO_PASSWORD, actor="demo")
    print(f"\n== review app: http://127.0.0.1:{port}  (login: {DEMO_USER} / {DEMO_PASSWORD}; Ctrl-C stops)", flush=True)
    try:
        serve(store, host="127.0.0.1", port=port, block=True)
    except KeyboardInterrupt:
        pass
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vialinspect.demo", description="Run the vialinspect demo.")
    p.add_argument("--out", default="demo_out", help="where the demo writes (default demo_out)")
    p.add_argument("--containers", type=int, default=120, help="containers to simulate (default 120)")
    p.add_argument("--station-units", type=int, default=300, help="units the station inspects (default 300)")
    p.add_argument("--no-new-line", action="store_true",
                   help="skip learning a new line from its own images (ImageFolder, train, evaluate)")
    p.add_argument("--new-line-minutes", type=float, default=NEW_LINE_MINUTES,
                   help=f"training budget for the new line in minutes (default {NEW_LINE_MINUTES:g})")
    p.add_argument("--new-line-containers", type=int, default=NEW_LINE_CONTAINERS,
                   help=f"units of the new line (default {NEW_LINE_CONTAINERS}; at least 30, so that every split "
                        "has some)")
    p.add_argument("--no-review", action="store_true", help="end without starting the review app")
    p.add_argument("--port", type=int, default=7860, help="review app port on 127.0.0.1 (default 7860)")
    a = p.parse_args(argv)
    if a.new_line_containers < 30:
        p.error("--new-line-containers: at least 30 (fewer leave the line without a validation or test split)")
    if a.new_line_minutes <= 0:
        p.error("--new-line-minutes: must be positive")
    return run(Path(a.out), a.containers, a.station_units, review=not a.no_review, port=a.port,
               new_line=not a.no_new_line, new_line_containers=a.new_line_containers,
               new_line_minutes=a.new_line_minutes)


if __name__ == "__main__":
    sys.exit(main())
