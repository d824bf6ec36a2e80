#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Liger-Kernel's fused linear DPO loss (`LigerFusedLinearDPOLoss`), one process per run, on
the inputs bench_head builds: an anchor beside prefopt's methods in bench/head_matrix.py.

Prints one JSON line with bench_head's fields (method "liger"); bench/anchor_head.py says how
the inputs, times and memory are made.

  liger_head.py --N 4096 --H 768 --V 50257 --T 512 --dtype bf16 [--masked 0.5] [--reps 2]
                [--threads 2] [--device cpu|cuda] [--chunk-size 1] [--no-compile]

Liger takes inputs already shifted, so it gets hidden[:, :-1] and labels[:, 1:]. It runs
without a reference model (use_ref_model=False). Liger accumulates the weight gradient in the
weight's dtype (`zeros_like(weight)`) and computes each chunk's gradient with torch.func;
`compiled` (default) runs that through torch.compile, as Liger's users do: a first call on one
pair of 8 tokens compiles it before the memory baseline is taken, then the warm-up run.
"""
import importlib.metadata

import torch

import anchor_head


def add_args(p):
    p.add_argument("--chunk-size", type=int, default=1, help="pairs per chunk (Liger's default 1)")
    p.add_argument("--no-compile", action="store_true", help="Liger's compiled=False")


def make_loss(a, h, w, labels, sync):
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

    loss_fn = LigerFusedLinearDPOLoss(beta=0.1, use_ref_model=False, compiled=not a.no_compile,
                                      chunk_size=a.chunk_size, loss_type="sigmoid")

    def loss_of_run(hh=h[:, :-1], ll=labels[:, 1:]):
        out = loss_fn(w, hh, ll)
        return out[0] if isinstance(out, tuple) else out

    if not a.no_compile:
        # torch.compile's first call (Python objects, the inductor's code) on a pair of 8 tokens
        # (the same head; the sequence length is marked dynamic), so that the memory of
        # compiling is not counted as the method's.
        pair = [0, h.size(0) // 2]
        torch.autograd.grad(loss_of_run(h[pair, :8], labels[pair, 1:9]), [h, w])
        sync()
    return loss_of_run


def fields(a):
    return {"chunk_size": a.chunk_size, "compiled": not a.no_compile,
            "liger": importlib.metadata.version("liger-kernel")}


if __name__ == "__main__":
    anchor_head.run("liger", __doc__, add_args, make_loss, fields)
