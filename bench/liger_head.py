#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Liger-Kernel's fused linear DPO loss (`LigerFusedLinearDPOLoss`), one process per run, on
the inputs bench_head builds: the anchor beside prefopt's methods in bench/head_matrix.py.

Prints one JSON line with bench_head's fields (method "liger"): wall times of DPO (sigmoid)
forward + backward to the hidden states and the weight, the peak RSS beyond what the process
held before the first run (VmHWM after /proc/self/clear_refs), and on CUDA the caching
allocator's peak beyond the inputs as alloc_extra_bytes (-1 on CPU, where Python has no
counting allocator).

  liger_head.py --N 4096 --H 768 --V 50257 --T 512 --dtype bf16 [--masked 0.5] [--reps 2]
                [--threads 2] [--device cpu|cuda] [--chunk-size 1] [--no-compile]

The inputs equal bench_head's bit for bit (same generator, seed and order, made on the CPU):
hidden [N/T, T, H], weight [V, H] / sqrt(H), labels with the first max(1, masked·T) positions
of every sequence ignored; chosen sequences first. Liger takes inputs already shifted, so it
gets hidden[:, :-1] and labels[:, 1:], the pairs bench_head's methods score. It runs without a
reference model (use_ref_model=False: reference log-probs 0); run bench_head with
--zero-reference for the same loss. Liger accumulates the weight gradient in the weight's
dtype (`zeros_like(weight)`) and computes each chunk's gradient with torch.func; `compiled`
(default) runs that through torch.compile, as Liger's users do: a first call on one pair of 8
tokens compiles it before the memory baseline is taken, then the warm-up run.
"""
import argparse
import importlib.metadata
import json
import math
import os
import statistics
import time

import torch


def status_bytes(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return -1


def reset_peak_rss():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--N", type=int, default=4096)
    p.add_argument("--H", type=int, default=768)
    p.add_argument("--V", type=int, default=50257)
    p.add_argument("--T", type=int, default=512)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--masked", type=float, default=0.0)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--chunk-size", type=int, default=1, help="pairs per chunk (Liger's default 1)")
    p.add_argument("--no-compile", action="store_true", help="Liger's compiled=False")
    a = p.parse_args()
    if a.N % (2 * a.T) != 0:
        p.error(f"N must be a multiple of 2T (whole pairs), got N = {a.N}, T = {a.T}")
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

    torch.set_num_threads(a.threads if a.threads > 0 else os.cpu_count())
    dev = torch.device(a.device)
    cuda = dev.type == "cuda"
    st = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    torch.manual_seed(0)
    S = a.N // a.T
    # bench_head's order of draws: hidden, weight, labels.
    h = torch.randn(S, a.T, a.H).to(st).to(dev).requires_grad_()
    w = (torch.randn(a.V, a.H) / math.sqrt(a.H)).to(st).to(dev).requires_grad_()
    labels = torch.randint(a.V, (S, a.T), dtype=torch.long)
    labels[:, : max(1, int(a.masked * a.T))] = -100
    labels = labels.to(dev)
    loss_fn = LigerFusedLinearDPOLoss(beta=0.1, use_ref_model=False, compiled=not a.no_compile,
                                      chunk_size=a.chunk_size, loss_type="sigmoid")

    def sync():
        if cuda:
            torch.cuda.synchronize(dev)

    if not a.no_compile:
        # torch.compile's first call (Python objects, the inductor's code) on a pair of 8 tokens
        # (the same head; the sequence length is marked dynamic), so that the memory of
        # compiling is not counted as the method's.
        pair = [0, S // 2]
        out = loss_fn(w, h[pair, :8], labels[pair, 1:9])
        torch.autograd.grad(out[0] if isinstance(out, tuple) else out, [h, w])
        sync()
    rss_before = status_bytes("VmRSS")
    hwm_ok = reset_peak_rss()
    times, alloc_extra, loss = [], 0, 0.0
    for i in range(a.reps + 1):
        if cuda:
            sync()
            torch.cuda.reset_peak_memory_stats(dev)
            live = torch.cuda.memory_allocated(dev)
        t0 = time.perf_counter()
        out = loss_fn(w, h[:, :-1], labels[:, 1:])
        l = out[0] if isinstance(out, tuple) else out
        torch.autograd.grad(l, [h, w])
        loss = l.item()
        sync()
        s = time.perf_counter() - t0
        if cuda:
            alloc_extra = max(alloc_extra, torch.cuda.max_memory_allocated(dev) - live)
        if i > 0:
            times.append(s)
    hwm = status_bytes("VmHWM")

    print(json.dumps({
        "method": "liger", "N": a.N, "H": a.H, "V": a.V, "T": a.T, "dtype": a.dtype,
        "masked": a.masked, "device": a.device, "chunk_size": a.chunk_size,
        "compiled": not a.no_compile, "threads": torch.get_num_threads(), "times_s": times,
        "median_s": statistics.median(times), "alloc_extra_bytes": alloc_extra if cuda else -1,
        "rss_extra_bytes": hwm - rss_before if hwm_ok and hwm > 0 else -1,
        "inputs_bytes": (h.numel() + w.numel()) * h.element_size(), "loss": loss,
        "liger": importlib.metadata.version("liger-kernel"), "torch": torch.__version__}))


if __name__ == "__main__":
    main()
