"""`make demo`: the whole product on a small embedded default, step by step.

Today: simulate a small dataset, validate it and write an annotated contact sheet. Each later part of the
product (training, export, station, review) adds its step here.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .cli import main as cli


def run(out: Path, containers: int = 120) -> int:
    data = out / "data"
    steps = [
        ("simulate a dataset", ["generate", "--out", str(data), "--containers", str(containers), "--frames", "4",
                                "--seed", "7", "--overwrite"]),
        ("validate it", ["dataset", "check", str(data)]),
        ("contact sheet", ["dataset", "preview", str(data), "--out", str(out / "contact_sheet.png")]),
    ]
    for i, (title, argv) in enumerate(steps, 1):
        print(f"\n== demo step {i}/{len(steps)}: {title}: vialinspect {' '.join(argv)}", flush=True)
        rc = cli(argv)
        if rc != 0:
            print(f"demo stopped: step {i} failed (exit {rc})", file=sys.stderr)
            return rc
    print(f"\ndemo done: dataset in {data}, contact sheet in {out / 'contact_sheet.png'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vialinspect.demo", description="Run the vialinspect demo.")
    p.add_argument("--out", default="demo_out", help="where the demo writes (default demo_out)")
    p.add_argument("--containers", type=int, default=120, help="containers to simulate (default 120)")
    a = p.parse_args(argv)
    return run(Path(a.out), a.containers)


if __name__ == "__main__":
    sys.exit(main())
