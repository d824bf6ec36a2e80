#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Runs bench_head's methods side by side, one process per method and configuration, under the
same allocator settings, and prints the LM-head table of bench/RESULTS.md.

Every process runs with GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (transparent huge pages for the
heap), so no method is charged for page faults the others avoid. The order of the methods rotates
from one configuration to the next, so slow drift of the machine does not favour one of them.

  bench/head_matrix.py --bench build-torch2/bench/bench_head --out bench/results/head.jsonl
  bench/head_matrix.py --table bench/results/head.jsonl        # the table from saved lines

Ratios are each method's median time, counting-allocator peak and peak-RSS extra over naive's.
`--methods naive two_pass one_pass gemm3` adds bench_head's three-GEMM floor (the scored rows'
z = h·Wᵀ, z·W and zᵀ·h with ATen's matmul, nothing else): the table then gains its time and each
method's time over it, which says how much of a method is not GEMM.
"""
import argparse
import itertools
import json
import os
import subprocess
import sys

METHODS = ["naive", "two_pass", "one_pass"]
FLOOR = "gemm3"


def run(bench, method, cfg, reps, threads):
    env = dict(os.environ, GLIBC_TUNABLES="glibc.malloc.hugetlb=1")
    cmd = [bench, "--method", method, "--N", str(cfg["N"]), "--H", str(cfg["H"]),
           "--V", str(cfg["V"]), "--T", str(cfg["T"]), "--dtype", cfg["dtype"], "--masked", str(cfg["masked"]),
           "--reps", str(reps), "--threads", str(threads)]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def key(r):
    return (r["N"], r["H"], r["V"], r["dtype"], r["masked"], r["T"])


def table(lines):
    rows = {}
    for r in lines:
        rows.setdefault(key(r), {})[r["method"]] = r
    floor = any(FLOOR in m for m in rows.values())
    mb = 1 / 2**20
    head = ("| N × H × V | T | dtype | masked | naive s | two-pass s | one-pass s | two-pass/naive | "
            "one-pass/naive | naive extra RSS MB | one-pass extra RSS MB | RSS one-pass/naive | "
            "RSS two-pass/naive | alloc one-pass/naive |")
    if floor:
        head += " floor s | naive/floor | two-pass/floor | one-pass/floor |"
    print(head)
    print("|---|---:|---|---:|" + "---:|" * (head.count("|") - 5))
    for k in sorted(rows, key=lambda k: (k[3], k[1], k[2], k[5], k[4])):
        m = rows[k]
        if not all(x in m for x in METHODS) or (floor and FLOOR not in m):
            continue
        n, o, t = m["naive"], m["one_pass"], m["two_pass"]
        line = (f"| {k[0]} × {k[1]} × {k[2]} | {k[5]} | {k[3]} | {k[4]:g} | {n['median_s']:.2f} | "
                f"{t['median_s']:.2f} | {o['median_s']:.2f} | "
                f"{t['median_s'] / n['median_s']:.2f} | {o['median_s'] / n['median_s']:.2f} | "
                f"{n['rss_extra_bytes'] * mb:.0f} | {o['rss_extra_bytes'] * mb:.0f} | "
                f"{o['rss_extra_bytes'] / n['rss_extra_bytes']:.3f} | "
                f"{t['rss_extra_bytes'] / n['rss_extra_bytes']:.3f} | "
                f"{o['alloc_extra_bytes'] / n['alloc_extra_bytes']:.3f} |")
        if floor:
            f = m[FLOOR]["median_s"]
            line += (f" {f:.2f} | {n['median_s'] / f:.2f} | {t['median_s'] / f:.2f} | "
                     f"{o['median_s'] / f:.2f} |")
        print(line)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--bench", help="path to bench_head")
    p.add_argument("--out", help="append each process's JSON line here")
    p.add_argument("--table", help="print the table of a saved JSON-lines file and exit")
    p.add_argument("--N", type=int, nargs="+", default=[4096])
    p.add_argument("--T", type=int, default=512, help="tokens per sequence (a pair is 2T)")
    p.add_argument("--H", type=int, nargs="+", default=[768, 2048])
    p.add_argument("--V", type=int, nargs="+", default=[50257, 151936])
    p.add_argument("--dtype", nargs="+", default=["fp32", "bf16"])
    p.add_argument("--masked", type=float, nargs="+", default=[0.0, 0.5])
    p.add_argument("--reps", type=int, default=2, help="timed runs after one warm-up")
    p.add_argument("--threads", type=int, default=0, help="0: every hardware thread")
    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS + [FLOOR],
                   help="bench_head methods to run (naive, two_pass and one_pass are required "
                        "for the table)")
    a = p.parse_args()
    if a.table:
        with open(a.table) as f:
            table([json.loads(l) for l in f if l.strip()])
        return
    if not a.bench:
        p.error("--bench or --table is required")
    lines = []
    configs = [dict(N=n, H=h, V=v, T=a.T, dtype=d, masked=m)
               for d, h, v, m, n in itertools.product(a.dtype, a.H, a.V, a.masked, a.N)]
    for i, cfg in enumerate(configs):
        j = i % len(a.methods)
        order = a.methods[j:] + a.methods[:j]
        for method in order:
            r = run(a.bench, method, cfg, a.reps, a.threads)
            lines.append(r)
            print(json.dumps(r), file=sys.stderr, flush=True)
            if a.out:
                with open(a.out, "a") as f:
                    f.write(json.dumps(r) + "\n")
    table(lines)


if __name__ == "__main__":
    main()
