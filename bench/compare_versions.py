#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Before/after table of two builds' Google Benchmark JSON files (<bench>_{old,new}_<round>.json in one
folder): each case's prefopt/baseline ratio per build (median over rounds) and their quotient.

  bench/compare_versions.py bench/results/cpu-2026-12-01/regress
"""
import glob
import json
import re
import statistics
import sys

d = sys.argv[1]
def medians(path):
    out = {}
    for b in json.load(open(path))["benchmarks"]:
        if b.get("aggregate_name") == "median":
            out[b["run_name"]] = b["real_time"]
    return out
rows = {}
for bench, pro, base in [("logprobs", "prefopt", "naive"), ("fused", "prefopt", "naive"), ("losses", "prefopt", "composite")]:
    for ver in ["old", "new"]:
        for path in sorted(glob.glob(f"{d}/{bench}_{ver}_*.json")):
            try:
                m = medians(path)
            except ValueError:
                continue
            for name, t in m.items():
                if f"/{pro}/" in name or name.endswith(f"/{pro}"):
                    other = name.replace(f"/{pro}/", f"/{base}/") if f"/{pro}/" in name else name[:-len(pro)] + base
                    if other in m:
                        key = (bench, re.sub(r"/(iterations|repeats|min_time|real_time).*", "", name.replace(f"/{pro}", "")))
                        rows.setdefault(key, {}).setdefault(ver, []).append(t / m[other])
print("| bench | case | prefopt/baseline before (6e34b03) | after (main + this change) | after/before |")
print("|---|---|---:|---:|---:|")
ratios = []
for (bench, case), v in sorted(rows.items()):
    if "old" in v and "new" in v:
        o, n = statistics.median(v["old"]), statistics.median(v["new"])
        ratios.append(n / o)
        print(f"| {bench} | {case} | {o:.3f} | {n:.3f} | {n/o:.2f} |")
print(f"\nafter/before over {len(ratios)} cases: median {statistics.median(ratios):.2f}, min {min(ratios):.2f}, max {max(ratios):.2f}")
