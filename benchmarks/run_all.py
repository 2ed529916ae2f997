"""Run every benchmark (``--quick``: each in its small mode, as CI does)."""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

BENCHMARKS = ["exactness", "mamba1_scan", "follow_up", "oprm_vs_plain", "memory", "associative_recall", "state_collapse",
              "peers", "handoff", "served", "decode", "rwkv67_follow_up",
              "hybrid_follow_up", "real_size"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--only", nargs="*", choices=BENCHMARKS)
    p.add_argument("--out", default=None)
    args, extra = p.parse_known_args()
    failed = []
    for name in args.only or BENCHMARKS:
        cmd = [sys.executable, "-m", f"benchmarks.{name}"] + (["--quick"] if args.quick else [])
        cmd += (["--out", args.out] if args.out else []) + extra
        t0 = time.perf_counter()
        print(f"== {' '.join(cmd[2:])}", flush=True)
        if subprocess.run(cmd).returncode != 0:
            failed.append(name)
        print(f"   {name}: {time.perf_counter() - t0:.0f}s", flush=True)
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
