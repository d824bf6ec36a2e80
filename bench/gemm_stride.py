#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""The one-pass op's three GEMMs per chunk (PyTorch's CPU matmul, fp32) with the logits buffer's
rows at different strides: V itself (odd for GPT-2's 50,257) and V rounded up to 64 bytes, with
one and two more lines. Why `detail::fused::buffer_stride` pads the rows on CPU.

  bench/gemm_stride.py [--H 768] [--V 50257] [--N 4096] [--C 1024] [--threads 2] [--rounds 2]
                       [--reps 3]

Per stride, N/C chunks of C rows each: the logits z = h_c · Wᵀ into the [C, V] view, dh_c = z · W,
and dW += zᵀ · h_c (addmm_), each the best of `--reps` passes over all chunks, the passes of all
strides interleaved; the rate counts 2·N·H·V FLOPs per GEMM. Last, for scale, the logits
computed transposed (W · h_cᵀ, [V, C]). Each round ends with the time at stride V over the time
at the aligned stride, per GEMM.
"""
import argparse
import time

import torch


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--H", type=int, default=768)
    p.add_argument("--V", type=int, default=50257)
    p.add_argument("--N", type=int, default=4096)
    p.add_argument("--C", type=int, default=1024)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--reps", type=int, default=3)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    N, H, V, C = a.N, a.H, a.V, a.C
    g = torch.Generator().manual_seed(0)
    W = torch.randn(V, H, generator=g) / H**0.5
    h = torch.randn(N, H, generator=g)
    dh = torch.empty(N, H)
    dW = torch.zeros(V, H)
    flops = 2 * N * H * V
    line = 16  # fp32 entries per 64-byte line
    aligned = (V + line - 1) // line * line
    strides = [V] + ([aligned] if aligned != V else []) + [aligned + line, aligned + 2 * line]
    print(f"torch {torch.__version__}, {a.threads} threads, N {N}, H {H}, V {V}, chunks of {C}")

    def one_pass(f):
        t0 = time.perf_counter()
        for i in range(N // C):
            f(i)
        return time.perf_counter() - t0

    def rows(i):
        return slice(i * C, (i + 1) * C)

    tasks = []
    for ld in strides:
        z = torch.randn(C, ld, generator=g)[:, :V]
        tasks += [(f"logits  stride {ld}", lambda i, z=z: torch.mm(h[rows(i)], W.t(), out=z)),
                  (f"dh      stride {ld}", lambda i, z=z: torch.mm(z, W, out=dh[rows(i)])),
                  (f"dW      stride {ld}", lambda i, z=z: dW.addmm_(z.t(), h[rows(i)]))]
    zt = torch.empty(V, C)
    tasks.append(("logitsᵀ [V, C]", lambda i: torch.mm(W, h[rows(i)].t(), out=zt)))
    for r in range(a.rounds):
        # Passes interleaved over all strides, the order rotating, the best of `reps` each: a
        # slow spell of the (shared) machine then costs every stride alike.
        res = {name: float("inf") for name, _ in tasks}
        for rep in range(a.reps):
            k = rep * len(tasks) // a.reps
            for name, f in tasks[k:] + tasks[:k]:
                res[name] = min(res[name], one_pass(f))
        print(f"round {r + 1}")
        for k, t in res.items():
            print(f"  {k:24s} {t:7.3f} s  {flops / t / 1e9:6.1f} GFLOP/s", flush=True)
        for op in ("logits", "dh", "dW"):
            odd, al = res[f"{op:8s}stride {V}"], res[f"{op:8s}stride {aligned}"]
            print(f"  {op}: stride {V} takes {odd / al:.2f}x the time of stride {aligned}")


if __name__ == "__main__":
    main()
