#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Turns bench_logprobs' JSON output (--benchmark_out=...json) into the markdown tables of
bench/RESULTS.md: median time, peak extra memory, and prefopt's ratios to each baseline."""
import json
import re
import sys


SUFFIX = {"": 1, "k": 1e3, "M": 1e6, "G": 1e9, "m": 1e-3, "u": 1e-6, "n": 1e-9}


def parse_console(text):
    """The console format, for runs cut short before the JSON file was written."""
    runs = []
    for line in text.splitlines():
        f = line.split()
        if not f or not f[0].endswith("_median"):
            continue
        r = {"name": f[0], "aggregate_name": "median", "real_time": float(f[1])}
        for kv in f[6:]:
            k, v = kv.split("=")
            m = re.match(r"(-?[0-9.]+)([kMGmun]?)$", v)
            r[k] = float(m.group(1)) * SUFFIX[m.group(2)]
        runs.append(r)
    return runs


def main(path):
    text = open(path).read()
    try:
        runs = json.loads(text)["benchmarks"]
    except ValueError:
        runs = parse_console(text)
    rows = {}
    for r in runs:
        if r.get("aggregate_name") != "median":
            continue
        m = re.match(r"(fwd|fwd_bwd)/(\w+)/tokens:(\d+)/V:(\d+)/bits:(\d+)", r["name"])
        mode, method, tokens, vocab, bits = m.groups()
        key = (mode, int(tokens), int(vocab), "fp32" if bits == "32" else "bf16")
        rows.setdefault(key, {})[method] = r
    for mode in ("fwd", "fwd_bwd"):
        title = "forward (no grad)" if mode == "fwd" else "forward + backward"
        extra = "extra_pct" if mode == "fwd" else "extra_beyond_grad_pct"
        print(f"\n#### {title}\n")
        print("| B·T | V | dtype | logits MB | prefopt ms | naive ms | TRL ms | time naive/prefopt | "
              "time TRL/prefopt | prefopt extra % | naive extra % | TRL extra % |")
        print("|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for key in sorted(k for k in rows if k[0] == mode):
            r = rows[key]
            if not all(m in r for m in ("prefopt", "naive", "trl")):
                continue
            t = {m: r[m]["real_time"] for m in r}
            e = {m: r[m][extra] for m in r}
            print(f"| {key[1]} | {key[2]} | {key[3]} | {r['prefopt']['logits_MB']:.0f} | "
                  f"{t['prefopt']:.1f} | {t['naive']:.1f} | {t['trl']:.1f} | "
                  f"{t['naive'] / t['prefopt']:.1f}x | {t['trl'] / t['prefopt']:.1f}x | "
                  f"{e['prefopt']:.3f} | {e['naive']:.0f} | {e['trl']:.0f} |")


if __name__ == "__main__":
    main(sys.argv[1])
