"""`make demo`: the whole product on a small embedded default, step by step.

Simulate a small dataset, validate it, write an annotated contact sheet, evaluate the committed default
model on it, run the inspection station on the simulator as a camera with that model, and end with the QA
review app serving the station's flagged units (a demo reviewer login is printed).
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


def run(out: Path, containers: int = 120, station_units: int = 300, review: bool = True, port: int = 7860) -> int:
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
    shutil.rmtree(out / "station_store", ignore_errors=True)  # a fresh line run each time
    for i, (title, argv) in enumerate(steps, 1):
        print(f"\n== demo step {i}/{len(steps)}: {title}: vialinspect {' '.join(argv)}", flush=True)
        rc = cli(argv)
        if rc != 0:
            print(f"demo stopped: step {i} failed (exit {rc})", file=sys.stderr)
            return rc
    print(f"\ndemo done: dataset {data}, contact sheet {out / 'contact_sheet.png'}, report {out / 'report'}, "
          f"station records {out / 'station_store'}")
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
    p.add_argument("--no-review", action="store_true", help="end without starting the review app")
    p.add_argument("--port", type=int, default=7860, help="review app port on 127.0.0.1 (default 7860)")
    a = p.parse_args(argv)
    return run(Path(a.out), a.containers, a.station_units, review=not a.no_review, port=a.port)


if __name__ == "__main__":
    sys.exit(main())
