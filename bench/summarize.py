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


def fused_table(runs):
    rows = {}
    for r in runs:
        m = re.match(r"fwd_bwd/([^/]+)/N:(\d+)/H:(\d+)/V:(\d+)/bits:(\d+)/half_masked:(\d)", r["name"])
        if not m or r.get("aggregate_name") != "median":
            continue
        method, n, h, v, bits, masked = m.groups()
        key = (int(n), int(v), int(h), "fp32" if bits == "32" else "bf16", masked == "1")
        rows.setdefault(key, {})[method] = r
    print("| N | H | V | dtype | half masked | prefopt ms | naive ms | time prefopt/naive | "
          "prefopt extra MB | naive extra MB | memory prefopt/naive |")
    print("|---:|---:|---:|---|---|---:|---:|---:|---:|---:|---:|")
    for key in sorted(rows):
        r = rows[key]
        if "prefopt" not in r or "naive" not in r:
            continue
        p, q = r["prefopt"], r["naive"]
        print(f"| {key[0]} | {key[2]} | {key[1]} | {key[3]} | {'yes' if key[4] else 'no'} | "
              f"{p['real_time']:.0f} | {q['real_time']:.0f} | {p['real_time'] / q['real_time']:.2f} | "
              f"{p['extra_MB']:.0f} | {q['extra_MB']:.0f} | {p['extra_MB'] / q['extra_MB']:.3f} |")


def loss_table(runs):
    """bench_losses: each loss on 64 pairs, prefopt against its hand-written composite."""
    rows = {}
    for r in runs:
        m = re.match(r"loss/([^/]+)/(prefopt|composite)", r["name"])
        if m and r.get("aggregate_name") == "median":
            rows.setdefault(m.group(1), {})[m.group(2)] = r["real_time"]
    print("| loss | prefopt us | composite us | prefopt/composite |")
    print("|---|---:|---:|---:|")
    for name, t in rows.items():
        if "prefopt" in t and "composite" in t:
            print(f"| {name} | {t['prefopt']:.1f} | {t['composite']:.1f} | "
                  f"{t['prefopt'] / t['composite']:.2f}x |")


def main(path):
    text = open(path).read()
    try:
        runs = json.loads(text)["benchmarks"]
    except ValueError:
        runs = parse_console(text)
    if any(r["name"].startswith("loss/") for r in runs):
        return loss_table(runs)
    if any(r["name"].startswith("fwd_bwd/") and "/N:" in r["name"] for r in runs):
        return fused_table(runs)
    rows = {}
    for r in runs:
        if r.get("aggregate_name") != "median":
            continue
        m = re.match(r"(fwd|fwd_bwd)/([^/]+)/tokens:(\d+)/V:(\d+)/bits:(\d+)", r["name"])
        if not m:
            print(f"summarize.py: skipping {r['name']} (not a gathering benchmark)", file=sys.stderr)
            continue
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
            if not all(m in r for m in ("prefopt", "naive")):
                continue
            t = {m: r[m]["real_time"] for m in r}
            e = {m: r[m][extra] for m in r}
            has_trl = "trl" in r
            trl_ms = f"{t['trl']:.1f}" if has_trl else "not run"
            trl_x = f"{t['trl'] / t['prefopt']:.1f}x" if has_trl else "-"
            trl_e = f"{e['trl']:.0f}" if has_trl else "-"
            print(f"| {key[1]} | {key[2]} | {key[3]} | {r['prefopt']['logits_MB']:.0f} | "
                  f"{t['prefopt']:.1f} | {t['naive']:.1f} | {trl_ms} | "
                  f"{t['naive'] / t['prefopt']:.1f}x | {trl_x} | "
                  f"{e['prefopt']:.3f} | {e['naive']:.0f} | {trl_e} |")
    # The "_entropy" methods: the same sums plus Σ entropy, differentiated through both.
    entropy_keys = sorted(k for k in rows if {"prefopt_entropy", "naive_entropy"} <= rows[k].keys())
    if entropy_keys:
        print("\n#### with the entropy term (`*_entropy` methods)\n")
        print("| pass | B·T | V | dtype | prefopt ms | naive ms | time prefopt/naive |")
        print("|---|---:|---:|---|---:|---:|---:|")
        for key in entropy_keys:
            p, q = (rows[key][m]["real_time"] for m in ("prefopt_entropy", "naive_entropy"))
            print(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {p:.1f} | {q:.1f} | {p / q:.2f} |")

if __name__ == "__main__":
    main(sys.argv[1])
