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
The last column takes the returned gradients' storage out of both peaks (`beyond_gradients`).

`--rounds R` runs every configuration R times in a row, the methods' order rotating each time.
On a VM whose speed drifts (naive's own time varied 1.4x within minutes on a 2-core EPYC) the
time ratios are then per round, one method's run against the other's run of the same round,
and the table gives their median and range: "1.18 (1.01-1.93)". Times and memory are the
methods' medians over the rounds. In a saved file the i-th line of a method for a configuration
is its round i, so files appended by separate runs of the same configurations pair the same way.

`--methods ... liger trl --anchor-python PY` adds the anchors on the same inputs, run by PY (a
Python with torch and the anchor): Liger-Kernel's LigerFusedLinearDPOLoss (bench/liger_head.py)
and TRL's fused head under its DPO loss (bench/trl_head.py: `trl` the log-probs alone,
`trl_trainer` with DPOTrainer's metric outputs too, `trl_trainer_all` also scoring the prompt,
as TRL does on the CPU). Every bench_head process then gets --zero-reference, since the
anchors run without a reference model, so all methods report the same loss. `--device cuda`
runs everything on the GPU and prints the GPU table instead (memory: the caching allocator's
peak beyond the inputs).
A method whose process fails (an anchor that does not import, an out-of-memory) is reported and
left out of the table, and the exit status is then 1.
`--methods naive two_pass one_pass gemm3` adds bench_head's three-GEMM floor (the scored rows'
z = h·Wᵀ, z·W and zᵀ·h with ATen's matmul, nothing else): the table then gains its time and each
method's time over it, which says how much of a method is not GEMM.
"""
import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys

METHODS = ["naive", "two_pass", "one_pass"]
FLOOR = "gemm3"
LIGER = "liger"
# The anchors' runners (bench/anchor_head.py's harness) and their arguments, by method name:
# "trl" computes the log-probs alone, as bench_head's methods do; "trl_trainer" also the
# per-token outputs DPOTrainer asks for (entropy, mean logit, top-1); "trl_trainer_all" scores
# every position as well, prompt included, as TRL's trainer does on the CPU.
ANCHORS = {LIGER: ["liger_head.py"], "trl": ["trl_head.py"],
           "trl_trainer": ["trl_head.py", "--trainer-outputs"],
           "trl_trainer_all": ["trl_head.py", "--trainer-outputs", "--all-positions"]}
HERE = os.path.dirname(os.path.abspath(__file__))
FAILED = []  # (method, configuration) of every process that failed


def run(a, method, cfg, extra=()):
    """One bench_head (or anchor) process; its JSON line, or None when it failed."""
    env = dict(os.environ, GLIBC_TUNABLES="glibc.malloc.hugetlb=1")
    args = ["--N", str(cfg["N"]), "--H", str(cfg["H"]), "--V", str(cfg["V"]), "--T", str(cfg["T"]),
            "--dtype", cfg["dtype"], "--masked", str(cfg["masked"]), "--reps", str(a.reps),
            "--threads", str(a.threads), "--device", a.device]
    if method in ANCHORS:
        script, *flags = ANCHORS[method]
        cmd = [a.anchor_python, os.path.join(HERE, script)] + args + flags
    else:
        cmd = [a.bench, "--method", method] + args + list(extra)
        if any(m in ANCHORS for m in a.methods):
            cmd.append("--zero-reference")
    try:
        out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    except subprocess.CalledProcessError as e:
        # One failing method (a missing or broken anchor, an out-of-memory) must not cost the
        # other methods' rows: report it and go on.
        print(f"head_matrix: {method} failed ({e.returncode}):\n{e.stderr}", file=sys.stderr)
        FAILED.append((method, cfg))
        return None
    return json.loads(out.strip().splitlines()[-1])


def record(r, lines, out):
    """Keeps a process's JSON line (None: it failed), echoes it and appends it to `out`."""
    if r is None:
        return
    lines.append(r)
    print(json.dumps(r), file=sys.stderr, flush=True)
    if out:
        with open(out, "a") as f:
            f.write(json.dumps(r) + "\n")


def key(r):
    return (r["N"], r["H"], r["V"], r["dtype"], r["masked"], r["T"], r.get("device", "cpu"))


def aggregate(rounds):
    """One record for a method's rounds: the first, with the medians of its times and peaks."""
    r = dict(rounds[0])
    for f in ("median_s", "rss_extra_bytes", "alloc_extra_bytes"):
        if all(f in x for x in rounds):
            r[f] = statistics.median(x[f] for x in rounds)
    r["rounds"] = rounds
    return r


def time_ratio(a, b):
    """a's time over b's, per round (round i of each), as "median" or "median (min-max)"."""
    q = [x["median_s"] / y["median_s"] for x, y in zip(a["rounds"], b["rounds"])]
    if len(q) == 1:
        return f"{q[0]:.2f}"
    return f"{statistics.median(q):.2f} ({min(q):.2f}-{max(q):.2f})"


def grouped(lines, by="method"):
    """{configuration: {r[by]: aggregate of its rounds}}, rounds in the order of the lines."""
    rows = {}
    for r in lines:
        rows.setdefault(key(r), {}).setdefault(r[by], []).append(r)
    return {k: {m: aggregate(rs) for m, rs in ms.items()} for k, ms in rows.items()}


def beyond_gradients(n, o):
    """Peak-RSS extra one-pass/naive with the storage of the returned gradients taken out of
    both: dW [V, H] and dh [N, H] in the input dtype, and for 16-bit inputs the one-pass op's
    fp32 dW accumulator, whose 4·V·H bytes become the returned dW (issue 18 allows it). Where
    one chunk holds the whole batch, the 16-bit op keeps no accumulator and this takes 2·V·H too
    much out; NaN where either peak is unknown."""
    if n["rss_extra_bytes"] < 0 or o["rss_extra_bytes"] < 0:
        return float("nan")
    e = 4 if n["dtype"] == "fp32" else 2
    vh, nh = n["V"] * n["H"], n["N"] * n["H"]
    grads = (vh + nh) * e
    one_pass = 4 * vh + nh * e
    return (o["rss_extra_bytes"] - one_pass) / (n["rss_extra_bytes"] - grads)


def gpu_table(rows):
    """#18's GPU targets: one-pass ≤ 1.2× the three-GEMM floor, ≥ 1.2× faster than Liger, and
    no more memory than Liger (the caching allocator's peak beyond the inputs)."""
    mb = 1 / 2**20
    anchors = [m for m in ANCHORS if any(m in x for x in rows.values())]
    names = [m for m in METHODS if any(m in x for x in rows.values())] + anchors
    head = ("| N × H × V | T | dtype | masked | " + " | ".join(f"{m} s" for m in names) +
            " | floor s | floor TFLOP/s | one-pass/floor | " +
            "".join(f"{g}/one-pass | " for g in anchors) +
            " | ".join(f"{m} MB" for m in names) + " |")
    print(head)
    print("|---|---:|---|---:|" + "---:|" * (head.count("|") - 5))
    for k in sorted(rows, key=lambda k: (k[3], k[1], k[2], k[5], k[4])):
        m = rows[k]
        f = m.get(FLOOR)
        o = m.get("one_pass")
        tflops = (6 * f["scored_tokens"] * k[1] * k[2] / f["median_s"] / 1e12
                  if f and "scored_tokens" in f else float("nan"))
        cell = lambda x, fmt: format(x, fmt) if x is not None else "-"
        print(f"| {k[0]} × {k[1]} × {k[2]} | {k[5]} | {k[3]} | {k[4]:g} | " +
              " | ".join(cell(m[n]["median_s"] if n in m else None, ".3f") for n in names) +
              f" | {cell(f['median_s'] if f else None, '.3f')} | {tflops:.0f} | " +
              f"{time_ratio(o, f) if o and f else '-'} | " +
              "".join(f"{time_ratio(m[g], o) if o and g in m else '-'} | " for g in anchors) +
              " | ".join(cell(m[n]["alloc_extra_bytes"] * mb if n in m else None, ".0f")
                         for n in names) + " |")


def table(lines):
    rows = grouped(lines)
    if any(r.get("device", "cpu") != "cpu" for r in lines):
        return gpu_table(rows)
    anchors = [g for g in ANCHORS if any(g in m for m in rows.values())]
    floor = any(FLOOR in m for m in rows.values())
    mb = 1 / 2**20
    head = ("| N × H × V | T | dtype | masked | naive s | two-pass s | one-pass s | two-pass/naive | "
            "one-pass/naive | naive extra RSS MB | one-pass extra RSS MB | RSS one-pass/naive | "
            "RSS two-pass/naive | alloc one-pass/naive | RSS one-pass/naive beyond gradients |")
    if floor:
        head += " floor s | naive/floor | two-pass/floor | one-pass/floor |"
    for g in anchors:
        head += f" {g} s | one-pass/{g} | {g} extra RSS MB | RSS one-pass/{g} |"
    print(head)
    print("|---|---:|---|---:|" + "---:|" * (head.count("|") - 5))
    for k in sorted(rows, key=lambda k: (k[3], k[1], k[2], k[5], k[4])):
        m = rows[k]
        if not all(x in m for x in METHODS) or (floor and FLOOR not in m):
            continue
        n, o, t = m["naive"], m["one_pass"], m["two_pass"]
        line = (f"| {k[0]} × {k[1]} × {k[2]} | {k[5]} | {k[3]} | {k[4]:g} | {n['median_s']:.2f} | "
                f"{t['median_s']:.2f} | {o['median_s']:.2f} | "
                f"{time_ratio(t, n)} | {time_ratio(o, n)} | "
                f"{n['rss_extra_bytes'] * mb:.0f} | {o['rss_extra_bytes'] * mb:.0f} | "
                f"{o['rss_extra_bytes'] / n['rss_extra_bytes']:.3f} | "
                f"{t['rss_extra_bytes'] / n['rss_extra_bytes']:.3f} | "
                f"{o['alloc_extra_bytes'] / n['alloc_extra_bytes']:.3f} | "
                f"{beyond_gradients(n, o):.3f} |")
        if floor:
            f = m[FLOOR]
            line += (f" {f['median_s']:.2f} | {time_ratio(n, f)} | {time_ratio(t, f)} | "
                     f"{time_ratio(o, f)} |")
        for g in (m.get(x) for x in anchors):
            if not g:  # an anchor that did not run (or failed) on this configuration
                line += " - | - | - | - |"
                continue
            line += (f" {g['median_s']:.2f} | {time_ratio(o, g)} | "
                     f"{g['rss_extra_bytes'] * mb:.0f} | "
                     f"{o['rss_extra_bytes'] / g['rss_extra_bytes']:.3f} |")
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
    p.add_argument("--rounds", type=int, default=1,
                   help="runs of every configuration, methods rotating; time ratios per round")
    p.add_argument("--threads", type=int, default=0, help="0: every hardware thread")
    p.add_argument("--methods", nargs="+", default=METHODS,
                   choices=METHODS + [FLOOR] + list(ANCHORS),
                   help="methods to run (naive, two_pass and one_pass are required for the CPU "
                        "table; the anchors need --anchor-python)")
    p.add_argument("--anchor-python", "--liger-python", default="python3",
                   help="the Python that runs bench/liger_head.py and bench/trl_head.py "
                        "(torch, liger-kernel, trl)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
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
        for rnd in range(a.rounds):
            j = (i + rnd) % len(a.methods)
            for method in a.methods[j:] + a.methods[:j]:
                record(run(a, method, cfg), lines, a.out)
    table(lines)
    # The table holds the rows that ran; the status says whether any process failed.
    for method, cfg in FAILED:
        print(f"head_matrix: {method} failed on {cfg}", file=sys.stderr)
    sys.exit(1 if FAILED else 0)


if __name__ == "__main__":
    main()
