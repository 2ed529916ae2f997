"""Evaluate a version-3 checkpoint against issue #25's targets: does it ship?

Exports the checkpoint as a model folder, runs the associative-recall benchmark on it
(held-out prose, the selector's defaults: ``python -m benchmarks.associative_recall``)
and checks what the issue asks before version 3 may replace version 2:

* OPRM recall >= 0.95 at every fact count from 16 to 1,024;
* ``Error`` on random absent keys >= 0.95 at every count (OPRM, defaults);
* per-chunk false positives (key-free chunks the paper's rule keeps) <= 1%, judged by
  the upper end of the 95% interval (documents resampled) as well as the rate;
* plain inference <= 0.1 from 256 facts (the demo must show the method, not a stronger model).

It prints each target with version 2's committed number beside it
(``benchmarks/results/associative_recall.json``) and writes ``verdict.json``.

    python training/eval_checkpoint.py --cheap        # minutes: 16 and 256 facts, 1 document per source
    python training/eval_checkpoint.py                # the full benchmark (every count, 4 documents): the ship decision

Only a full run can say "ship"; a cheap one says how far training has come.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "training"))

TARGETS = {"oprm": 0.95, "oprm_idk": 0.95, "false_positive_rate": 0.01, "plain_from_256": 0.1}
V2_RESULTS = ROOT / "benchmarks" / "results" / "associative_recall.json"
CHEAP = ["--facts", "16", "256", "--docs", "1", "--present", "6", "--absent", "6", "--near", "2"]


def check(result: dict[str, Any], full: bool) -> dict[str, Any]:
    """Each target: the measured values, whether it is met, and the verdict."""
    rows = {r["facts"]: r for r in result["rows"] if r["source"] == "all" and 16 <= r["facts"] <= 1024}
    fp = result["false_positives"]["all"]["paper"]
    checks = {
        "oprm >= 0.95 at every count": {str(n): round(r["oprm"], 3) for n, r in rows.items()},
        "Error on absent keys >= 0.95 at every count": {str(n): round(r["oprm_idk"], 3) for n, r in rows.items()},
        "per-chunk false positives <= 1% (rate, 95% interval)": {
            "rate": round(fp["rate"], 4), "ci95": [round(x, 4) for x in fp["ci95"]],
            "pairs": result["false_positives"]["all"]["key_free_pairs"]},
        "plain <= 0.1 from 256 facts": {str(n): round(r["plain"], 3) for n, r in rows.items() if n >= 256},
    }
    met = {
        "oprm >= 0.95 at every count": all(r["oprm"] >= TARGETS["oprm"] for r in rows.values()),
        "Error on absent keys >= 0.95 at every count": all(r["oprm_idk"] >= TARGETS["oprm_idk"] for r in rows.values()),
        "per-chunk false positives <= 1% (rate, 95% interval)": fp["ci95"][1] <= TARGETS["false_positive_rate"],
        "plain <= 0.1 from 256 facts": all(r["plain"] <= TARGETS["plain_from_256"] for n, r in rows.items() if n >= 256),
    }
    counts = sorted(rows)
    every_count = counts == [16, 32, 64, 128, 256, 512, 1024]
    ship = full and every_count and all(met.values())
    return {"measured": checks, "met": met, "fact_counts": counts, "full_run": full and every_count,
            "verdict": ("SHIP: every target met on the full benchmark" if ship else
                        "do not ship: " + ("targets missed: " + "; ".join(k for k, ok in met.items() if not ok)
                                           if not all(met.values()) else "all met here, but only a full run decides"))}


def v2_numbers() -> dict[str, Any] | None:
    if not V2_RESULTS.is_file():
        return None
    return check(json.loads(V2_RESULTS.read_text()), True)["measured"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt-dir", type=Path, default=ROOT / "training" / "checkpoints" / "demo-v3")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "demo-v3" / "eval",
                   help="the exported model folder, the benchmark's JSON and PNG, and verdict.json")
    p.add_argument("--cheap", action="store_true", help="16 and 256 facts, 1 document per source: minutes, no verdict")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--strict", action="store_true", help="exit 1 unless the verdict is SHIP")
    p.add_argument("bench_args", nargs="*", help="more options for benchmarks.associative_recall (after --)")
    args = p.parse_args(argv)

    import train_demo_v3

    model = args.out / "model"
    train_demo_v3.main(["--ckpt-dir", str(args.ckpt_dir), "--export-to", str(model), "--threads", str(args.threads)])
    cmd = [sys.executable, "-m", "benchmarks.associative_recall", "--model", str(model), "--out", str(args.out),
           "--threads", str(args.threads), *(CHEAP if args.cheap else []), *args.bench_args]
    print("running:", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)
    result = json.loads((args.out / "associative_recall.json").read_text())
    verdict = check(result, full=not args.cheap and not args.bench_args)
    state = json.loads((model / "training_log.json").read_text())
    verdict = {"checkpoint": str(args.ckpt_dir / "checkpoint.pt"), "recipe": state.get("recipe"),
               "benchmark_command": " ".join(cmd[1:]), **verdict, "v2": v2_numbers()}
    (args.out / "verdict.json").write_text(json.dumps(verdict, indent=2) + "\n")
    print(json.dumps({k: verdict[k] for k in ("recipe", "measured", "met", "verdict")}, indent=2))
    if verdict["v2"]:
        print("v2 (committed full run):", json.dumps(verdict["v2"]))
    return 0 if (not args.strict or verdict["verdict"].startswith("SHIP")) else 1


if __name__ == "__main__":
    raise SystemExit(main())
