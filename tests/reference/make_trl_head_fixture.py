#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Writes tests/fixtures/trl_fused_head.json: TRL's own fused LM head on small fp32 inputs, the
anchor that tests/test_fused_logprobs.cpp (`Fused.MatchesTrlsFusedHead`) holds prefopt's
`fused_logprobs` to.

TRL's `trl.kernels.ChunkedLogProbFunction` (DPOTrainer's head since TRL 1.15) runs on the scored
rows (h[mask], labels[mask], as its forward wrapper does where it compacts) with every
per-token output DPOTrainer reads: log-probs, entropy, log Σ_v p_v² (WPO), mean logit, whether
the label is the top-1 token. A vocabulary tile of 64 columns makes it fold several tiles per
row. The loss Σ_b c_b · Σ_t log p_{b,t}, with a random weight c_b per sequence, gives the
gradients of the hidden states, the weight and the bias through TRL's backward; adding
Σ_b e_b · Σ_t H_{b,t} (the entropies, fixed weights e_b) gives them through its entropy
term too. Each case
records the inputs (fp32 values in their shortest digits, which read back exactly), its
transform (logit scale, softcap, temperature), the per-token log-probs, the per-sequence sums
of log-probs, entropy, mean logit and top-1 hits, the token counts, DPOTrainer's WPO weights,
and the gradients of both losses.

About a third of the labels are the argmax of the transformed logits (computed in fp64), so
the top-1 count is not trivially zero, and no label is within 1e-3 of the best other logit, so
rounding cannot decide it; sequence 3 has nothing scored. Needs torch and trl:
    python3 tests/reference/make_trl_head_fixture.py [--out tests/fixtures/trl_fused_head.json]
"""
import argparse
import importlib.metadata
import json
import os

import numpy
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
B, T, H, V = 4, 9, 12, 130
ENTROPY_GRAD = [0.7, -1.3, 0.5, 0.9]  # e_b, the entropies' weights in the second loss
PROMPT = [3, 4, 2, T]  # leading unscored positions per sequence (sequence 3: all of them)
CASES = [
    # name, logit scale, softcap (None: off), temperature, bias
    ("plain", 1.0, None, 1.0, False),
    ("scale_softcap_temperature", 1.7, 10.0, 0.7, True),
]


def short(x):
    """An fp32 value as the double of its shortest fp32 digits (a smaller file), which the
    test's strtod and cast to float read back exactly; checked, since a double rounding could
    in principle land on the neighbouring fp32 value."""
    d = float(str(numpy.float32(x)))
    return d if numpy.float32(d) == numpy.float32(x) else x


def case(name, scale, softcap, temperature, with_bias, gen):
    from trl.kernels import ChunkedLogProbFunction

    h = (torch.randn(B, T, H, generator=gen, dtype=torch.float64) * 1.5).float()
    w = torch.randn(V, H, generator=gen, dtype=torch.float64).float()
    b = torch.randn(V, generator=gen, dtype=torch.float64).float() if with_bias else None
    c = torch.randn(B, generator=gen, dtype=torch.float64).float()
    # The transformed logits in fp64, for labels that are their argmax.
    z = h.double() @ w.double().t() + (b.double() if with_bias else 0)
    z = z * scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    z = z / temperature
    labels = torch.randint(V, (B, T), generator=gen)
    top = torch.rand(B, T, generator=gen) < 1 / 3
    labels = torch.where(top, z.argmax(-1), labels)
    # No label within 1e-3 of the best other logit: whether such a label is the top-1 token
    # would depend on fp32 rounding, not on the first-maximum rule. Those take the argmin.
    others = z.scatter(-1, labels.unsqueeze(-1), -torch.inf).amax(-1)
    near = (z.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - others).abs() <= 1e-3
    labels = torch.where(near, z.argmin(-1), labels)
    for s, k in enumerate(PROMPT):
        labels[s, :k] = -100
    mask = labels != -100

    hg, wg = h.clone().requires_grad_(), w.clone().requires_grad_()
    bg = b.clone().requires_grad_() if with_bias else None
    lp, ent, log_sum_sq, mean_logit, top1 = ChunkedLogProbFunction.apply(
        hg[mask], wg, bg, labels[mask], temperature, 64, softcap, scale, OUTPUTS)
    token = lp.new_zeros(mask.shape).masked_scatter(mask, lp)
    per_seq = lambda x: x.new_zeros(mask.shape).masked_scatter(mask, x).sum(1)
    # DPOTrainer's WPO weight (use_weighting): exp of the mean over scored tokens of
    # log p − log Σ_v p_v².
    count = mask.sum(1)
    wpo = torch.exp(per_seq(lp.detach() - log_sum_sq) / count.clamp_min(1))
    loss = (c * token.sum(1)).sum()
    loss.backward()
    # Again with the entropies in the loss, Σ_b c_b · Σ_t log p + Σ_b e_b · Σ_t H: TRL's backward
    # takes both upstream gradients (its `grad_entropy` term). Fixed weights, so that the
    # random inputs and every other value stay as before.
    e = torch.tensor(ENTROPY_GRAD)
    he, we = h.clone().requires_grad_(), w.clone().requires_grad_()
    be = b.clone().requires_grad_() if with_bias else None
    lp_e, ent_e, *_ = ChunkedLogProbFunction.apply(
        he[mask], we, be, labels[mask], temperature, 64, softcap, scale, OUTPUTS)
    ((c * per_seq(lp_e)).sum() + (e * per_seq(ent_e)).sum()).backward()
    f = lambda t: [short(x) for x in t.detach().flatten().tolist()]
    return {
        "name": name, "logit_scale": scale, "softcap": softcap or 0.0,
        "temperature": temperature, "B": B, "T": T, "H": H, "V": V,
        "hidden": f(h), "weight": f(w), "bias": f(b) if with_bias else None,
        "labels": labels.flatten().tolist(), "seq_grad": f(c),
        "token_logps": f(token), "sum": f(token.sum(1)), "entropy_sum": f(per_seq(ent)),
        "logits_sum": f(per_seq(mean_logit)), "correct": per_seq(top1.long()).tolist(),
        "count": count.tolist(), "wpo_weights": f(wpo),
        "d_hidden": f(hg.grad), "d_weight": f(wg.grad),
        "d_bias": f(bg.grad) if with_bias else None,
        "entropy_grad": f(e), "d_hidden_entropy": f(he.grad), "d_weight_entropy": f(we.grad),
        "d_bias_entropy": f(be.grad) if with_bias else None,
    }


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default=os.path.join(HERE, "..", "fixtures", "trl_fused_head.json"))
    a = p.parse_args()
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(18)
    fixture = {"trl": importlib.metadata.version("trl"), "torch": torch.__version__,
               "cases": [case(*c, gen) for c in CASES]}
    with open(a.out, "w") as f:
        json.dump(fixture, f, separators=(",", ":"))
        f.write("\n")


if __name__ == "__main__":
    main()
