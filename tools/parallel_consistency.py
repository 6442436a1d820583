"""Replay one saved batch under several parallel layouts on CPU gloo ranks and compare with the single-rank layout.

    python tools/parallel_consistency.py                        # tp2, pp2, dp2, ep2 (2 ranks) after the references
    python tools/parallel_consistency.py --layouts tp2,tp2pp2   # tp2pp2 needs 4 ranks (4 processes)
    python tools/parallel_consistency.py --case /tmp/case.pt --json out.json

Prints one line per layout and quantity (error, tolerance, ok); exits 1 if any comparison fails. See
``oar_megatron/policy/consistency.py`` for what is computed and compared.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from oar_megatron.policy import consistency as C  # noqa: E402
from tests.dist_harness import run_ranks  # noqa: E402


def run(layouts: list[str], case_path: str | None = None, tol: dict | None = None) -> dict:
    """{layout: {quantity: (error, tolerance, ok)}} plus timings; layouts grouped into one spawn per world size."""
    unknown = [n for n in layouts if n not in C.LAYOUTS or not C.LAYOUTS[n].reference]
    if unknown:
        raise ValueError(f"layouts: unknown or reference-only {unknown}; known: "
                         f"{', '.join(n for n, l in C.LAYOUTS.items() if l.reference)}")
    tmp = None
    if case_path is None:
        tmp = tempfile.TemporaryDirectory()
        case_path = os.path.join(tmp.name, "case.pt")
    C.save_case(case_path)
    refs_needed = sorted({C.LAYOUTS[n].reference for n in layouts})
    t0 = time.perf_counter()
    res = run_ranks(C.run_layouts, 1, case_path, refs_needed)
    refs = {n: C.assemble(res, n) for n in refs_needed}
    for n in refs_needed:
        C.save_reference(case_path, C.LAYOUTS[n].preset, refs[n])
    report: dict = {"_seconds": {"reference": time.perf_counter() - t0}}
    by_world: dict[int, list[str]] = {}
    for n in layouts:
        by_world.setdefault(C.LAYOUTS[n].world_size, []).append(n)
    for world, names in sorted(by_world.items()):
        t0 = time.perf_counter()
        res = run_ranks(C.run_layouts, world, case_path, names)
        report["_seconds"][f"world{world}"] = time.perf_counter() - t0
        for n in names:
            report[n] = C.compare(refs[C.LAYOUTS[n].reference], C.assemble(res, n), tol)
    if tmp is not None:
        tmp.cleanup()
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layouts", default="tp2,pp2,dp2,ep2")
    ap.add_argument("--case", default=None, help="where to save the batch (default: a temporary file)")
    ap.add_argument("--json", default=None, help="write the report here")
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    report = run([s for s in args.layouts.split(",") if s], args.case)
    ok = True
    for name, checks in report.items():
        if name.startswith("_"):
            continue
        for q, (err, tol, good) in checks.items():
            ok &= good
            print(f"{name:8s} {q:17s} err={err:.3e} tol={tol:.1e} {'ok' if good else 'FAIL'}")
    print("seconds:", {k: round(v, 1) for k, v in report["_seconds"].items()})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
