#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""TRL's fused LM head (`trl.kernels.ChunkedLogProbFunction`, the head DPOTrainer scores with
since TRL 1.15) under TRL's sigmoid DPO loss, one process per run, on the inputs bench_head
builds: an anchor beside prefopt's methods in bench/head_matrix.py.

Prints one JSON line with bench_head's fields (method "trl", "trl_trainer" or their "_all"
forms, below); bench/anchor_head.py says how the inputs, times and memory are made.

  trl_head.py --N 4096 --H 768 --V 50257 --T 512 --dtype fp32 [--masked 0.5] [--reps 2]
              [--threads 2] [--device cpu|cuda] [--trainer-outputs] [--all-positions]

What DPOTrainer does with the head, as its `_compute_loss` does it: labels[:, 1:] (prompt
positions -100) against hidden[:, :-1]; per-token log-probs summed per sequence, chosen first;
loss −log σ(β·Δ) averaged over pairs, β = 0.1, no reference model. The head computes the
log-probs alone, the work of bench_head's methods (method "trl"); `--trainer-outputs` also the
per-token outputs DPOTrainer asks for to log its metrics, the entropy, the mean logit and
whether the label is the top-1 token (method "trl_trainer"), which prefopt's methods here do
not compute. The head is two-pass: its forward folds [4096-token, 32,768-column] tiles of h·Wᵀ
into online log-sum-exp statistics, and its backward recomputes
each tile, turns it into the logits' gradient (in place on CUDA; through tile-sized
temporaries on the CPU) and adds its two gradient GEMMs into fp32 accumulators (four
GEMM-equivalents in all).

TRL compacts the scored positions (only rows whose label is not −100 reach a GEMM) on devices
with Triton; on the CPU its forward wrapper scores every position instead. This runner compacts
everywhere, the anchor at its best; `--all-positions` scores every position, as TRL's trainer
does on the CPU (the method name gains "_all"). On the CPU the tiles are folded by torch
operations on whole tiles; on CUDA by TRL's Triton kernels.
"""
import importlib.metadata

import torch
import torch.nn.functional as F

import anchor_head

# The per-token outputs DPOTrainer asks the fused head for without WPO weighting.
DPO_TRAINER_OUTPUTS = ("log_probs", "entropy", "mean_logits", "is_top1")
BETA = 0.1
# TRL's vocabulary width of a tile (trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE in 1.16).
DEFAULT_CHUNK = 32768


def add_args(p):
    p.add_argument("--trainer-outputs", action="store_true",
                   help="also the entropy, mean logit and top-1 DPOTrainer logs")
    p.add_argument("--all-positions", action="store_true",
                   help="score every position, as TRL's forward does on the CPU")


def make_loss(a, h, w, labels, sync):
    from trl.kernels import ChunkedLogProbFunction

    hs, lab = h[:, :-1], labels[:, 1:]
    mask = lab != -100
    outputs = DPO_TRAINER_OUTPUTS if a.trainer_outputs else ("log_probs",)
    chunk = tile_width()

    def loss_of_run():
        if a.all_positions:
            per_token = ChunkedLogProbFunction.apply(
                hs.reshape(-1, hs.size(-1)), w, None, lab.clamp(min=0).reshape(-1), 1.0,
                chunk, None, 1.0, outputs)
            log_probs = per_token[0].view(mask.shape).masked_fill(~mask, 0)
        else:
            per_token = ChunkedLogProbFunction.apply(
                hs[mask], w, None, lab[mask], 1.0, chunk, None, 1.0, outputs)
            log_probs = per_token[0].new_zeros(mask.shape).masked_scatter(mask, per_token[0])
        chosen, rejected = log_probs.sum(dim=1).chunk(2, dim=0)
        return -F.logsigmoid(BETA * (chosen - rejected)).mean()

    return loss_of_run


def tile_width():
    import trl.trainer.utils

    return getattr(trl.trainer.utils, "_CHUNKED_LOGPROB_CHUNK_SIZE", DEFAULT_CHUNK)


def fields(a):
    return {"trainer_outputs": a.trainer_outputs, "all_positions": a.all_positions,
            "chunk_size": tile_width(), "trl": importlib.metadata.version("trl")}


def method(a):
    return "trl" + ("_trainer" if a.trainer_outputs else "") + ("_all" if a.all_positions else "")


if __name__ == "__main__":
    anchor_head.run(method, __doc__, add_args, make_loss, fields)
