#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""The two-pass op's backward blockings side by side: `bench_head --method two_pass --backward B`
for each B, one process each, under head_matrix.py's allocator settings, in rounds whose order
alternates, and the table of per-round time ratios against the first blocking (the default for
fp32, kTiles) with the peak-RSS extras.

  bench/blockings.py --bench build-torch2/bench/bench_head --rounds 3 --out F.jsonl
  bench/blockings.py --table F.jsonl          # the table from saved lines

Round i of a blocking is its i-th line for a configuration, as in head_matrix.py.
"""
import argparse
import itertools
import json
import statistics

import head_matrix as hm


def table(lines, blockings):
    rows = hm.grouped(lines, by="backward")
    base = blockings[0]
    others = blockings[1:]
    print("| N × H × V | dtype | masked | " + " | ".join(f"{b} s" for b in blockings) + " | " +
          " | ".join(f"{b}/{base} per round (median)" for b in others) + " | " +
          " | ".join(f"{b} extra RSS MB" for b in blockings) + " |")
    print("|---|---|---:|" + "---|" * len(blockings) + "---|" * len(others) +
          "---:|" * len(blockings))
    fmt = lambda g: ", ".join(f"{r['median_s']:.1f}" for r in g["rounds"])
    for k in sorted(rows, key=lambda k: (k[3], k[1], k[2], k[4])):
        m = rows[k]
        if not all(b in m for b in blockings):
            continue
        cells = [fmt(m[b]) for b in blockings]
        for b in others:
            q = [y["median_s"] / x["median_s"] for x, y in zip(m[base]["rounds"], m[b]["rounds"])]
            cells.append(", ".join(f"{x:.2f}" for x in q) + f" ({statistics.median(q):.2f})")
        cells += [f"{m[b]['rss_extra_bytes'] / 2**20:.0f}" for b in blockings]
        print(f"| {k[0]} × {k[1]} × {k[2]} | {k[3]} | {k[4]:g} | " + " | ".join(cells) + " |")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--bench", help="path to bench_head")
    p.add_argument("--out", help="append each process's JSON line here")
    p.add_argument("--table", help="print the table of a saved JSON-lines file and exit")
    p.add_argument("--blockings", nargs="+", default=["tiles", "vocab_blocks"],
                   choices=["tiles", "vocab_blocks", "token_chunks", "auto"],
                   help="the first is the base of the ratios")
    p.add_argument("--N", type=int, default=4096)
    p.add_argument("--T", type=int, default=512)
    p.add_argument("--H", type=int, nargs="+", default=[768, 2048])
    p.add_argument("--V", type=int, nargs="+", default=[50257, 151936])
    p.add_argument("--dtype", nargs="+", default=["fp32"])
    p.add_argument("--masked", type=float, nargs="+", default=[0.0, 0.5])
    p.add_argument("--reps", type=int, default=1, help="timed runs after one warm-up")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="0: every hardware thread")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    a = p.parse_args()
    if a.table:
        with open(a.table) as f:
            table([json.loads(l) for l in f if l.strip()], a.blockings)
        return
    if not a.bench:
        p.error("--bench or --table is required")
    a.methods = ["two_pass"]  # what hm.run reads besides the paths and counts
    lines = []
    for rnd in range(a.rounds):
        for h, v, d, m in itertools.product(a.H, a.V, a.dtype, a.masked):
            cfg = dict(N=a.N, H=h, V=v, T=a.T, dtype=d, masked=m)
            order = a.blockings if rnd % 2 == 0 else a.blockings[::-1]
            for b in order:
                hm.record(hm.run(a, "two_pass", cfg, ["--backward", b, "--zero-reference"]),
                          lines, a.out)
    table(lines, a.blockings)


if __name__ == "__main__":
    main()
