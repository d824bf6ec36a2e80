# SPDX-License-Identifier: Apache-2.0
"""The harness that runs an anchor's fused LM-head DPO loss on bench_head's inputs, one process
per run: bench/liger_head.py and bench/trl_head.py give it their loss, it gives them the
inputs, the timing and the JSON line that bench/head_matrix.py reads.

The inputs equal bench_head's bit for bit (same generator, seed and order, made on the CPU):
hidden [N/T, T, H], weight [V, H] / sqrt(H), labels with the first max(1, masked·T) positions of
every sequence ignored; chosen sequences first. An anchor scores hidden[:, :-1] against
labels[:, 1:], the pairs bench_head's methods score, without a reference model (reference
log-probs 0): run bench_head with --zero-reference for the same loss.

Times are wall times of DPO (sigmoid) forward + backward to the hidden states and the weight
(`--reps` timed runs after a warm-up run). Memory: the peak RSS beyond what the process held
before the first run (VmHWM after /proc/self/clear_refs), and on CUDA the caching allocator's
peak beyond the inputs as alloc_extra_bytes (-1 on CPU, where Python has no counting
allocator).
"""
import argparse
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


def run(method, doc, add_args, make_loss, fields):
    """Parses the common arguments and `add_args(parser)`'s, builds the inputs, calls
    `make_loss(args, h, w, labels, sync)` once (its set-up, compiling included, happens before
    the memory baseline) for a function that returns the loss of one run, times that function
    with the backward, and prints one JSON line with `fields(args)` added. `method` is the
    method's name, or a function of the arguments that gives it."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--N", type=int, default=4096)
    p.add_argument("--H", type=int, default=768)
    p.add_argument("--V", type=int, default=50257)
    p.add_argument("--T", type=int, default=512)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--masked", type=float, default=0.0)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--device", default="cpu")
    add_args(p)
    a = p.parse_args()
    if a.N % (2 * a.T) != 0:
        p.error(f"N must be a multiple of 2T (whole pairs), got N = {a.N}, T = {a.T}")
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

    def sync():
        if cuda:
            torch.cuda.synchronize(dev)

    loss_of_run = make_loss(a, h, w, labels, sync)
    rss_before = status_bytes("VmRSS")
    hwm_ok = reset_peak_rss()
    times, alloc_extra, loss = [], 0, 0.0
    for i in range(a.reps + 1):
        if cuda:
            sync()
            torch.cuda.reset_peak_memory_stats(dev)
            live = torch.cuda.memory_allocated(dev)
        t0 = time.perf_counter()
        l = loss_of_run()
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
        "method": method(a) if callable(method) else method,
        "N": a.N, "H": a.H, "V": a.V, "T": a.T, "dtype": a.dtype,
        "masked": a.masked, "device": a.device, **fields(a),
        "threads": torch.get_num_threads(), "times_s": times,
        "median_s": statistics.median(times), "alloc_extra_bytes": alloc_extra if cuda else -1,
        "rss_extra_bytes": hwm - rss_before if hwm_ok and hwm > 0 else -1,
        "inputs_bytes": (h.numel() + w.numel()) * h.element_size(), "loss": loss,
        "torch": torch.__version__}))
