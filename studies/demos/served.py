"""Issue 18: does the served path score what the study measured? One cached cell, retrained, exported, served.

    .venv/bin/python studies/demos/served.py studies/demos/<level>/cells/<task>/<method>/seed-N-<key>.json \
        [--work runs/served] [--out studies/demos/served/<name>.json] [--export-arg=--quantize --export-arg=int8]

Prints and writes the cell's test score beside the retrained torch model's, the bundle Predictor's
(onnxruntime, in process) and the gRPC server's (`fsserve serve` + the KServe v2 client), and how many
labels agree row by row (fsserve.experiment.served).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def main(argv: list[str] | None = None) -> int:
    """Run the check and write its JSON report."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("cell", help="a cached cell's JSON")
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "k-shot"), help="k-shot root folder")
    p.add_argument("--work", default=str(ROOT / "runs" / "served"), help="scratch folder for the model and the bundle")
    p.add_argument("--out", help="report JSON (default: studies/demos/served/<level>-<task>-<method>-seed-N.json)")
    p.add_argument("--export-arg", action="append", default=[], help="extra `fsserve export` argument (repeatable)")
    p.add_argument("--batch", type=int, default=8, help="rows per gRPC request")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from fsserve.experiment.served import served_check

    cell = Path(args.cell).resolve()
    report = served_check(cell, args.data, args.work, export_args=args.export_arg, batch=args.batch)
    level = cell.parents[3].name
    out = Path(args.out) if args.out else ROOT / "studies" / "demos" / "served" / f"{level}-{report['task']}-{report['method']}-seed-{report['seed']}.json"
    report["level"] = level
    report["cell"] = str(cell.relative_to(ROOT)) if cell.is_relative_to(ROOT) else str(cell)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    print(json.dumps({k: report[k] for k in ("task", "method", "seed", "n_test", "test", "labels_agree", "seconds")}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
