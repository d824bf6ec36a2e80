#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Writes the parity fixtures of prefopt-train's tokenizer and model into tests/fixtures/.

The reference is Hugging Face's own code on the shared TinyStories-656K checkpoint:
  - tinystories_tokenizer.json: token ids and decoded text of a set of strings (unicode, CJK,
    emoji, whitespace runs, leading/trailing spaces, newlines, digits, rare bytes, the empty
    string, added tokens inside text, and seeded random strings) from the `tokenizers` library
    loading tokenizer.json, which is what transformers 4.x's LlamaTokenizerFast runs. What
    `transformers.AutoTokenizer` returns is recorded beside it: transformers 5.x rebuilds
    LlamaTokenizer with a Metaspace pre-tokenizer and differs on some of these strings.
  - tinystories_model.json + tinystories_logits.safetensors: fp32 logits of
    `LlamaForCausalLM.from_pretrained` (eager attention) on a right-padded batch of two
    sequences (every real position, all 2048 logits), and on one longer sequence the
    logsumexp and target logit at every position and the whole last row.

Needs PyPI's torch, transformers, tokenizers and safetensors. Run from anywhere:
    python3 examples/train/make_fixtures.py [--data ../shared/data] [--out tests/fixtures]
No HH-RLHF text is used.
"""
import argparse
import json
import os
import random

import safetensors.torch
import tokenizers
import torch
import transformers

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))

STRINGS = [
    "",
    "Hello world",
    "Once upon a time, there was a little girl named Lily.",
    " leading space",
    "  two leading spaces",
    "trailing space ",
    "trailing spaces   ",
    "   ",
    " ",
    "a  b   c    d",
    "tab\there",
    "line one\nline two\n\nline four\n",
    "\n\nHuman: What is 2+2?\n\nAssistant: It is 4.",
    "Digits 0123456789 and 3.14159, 1,000,000 and -42.",
    "Caf\u00e9 na\u00efve r\u00e9sum\u00e9",
    "\u4e2d\u6587\u5b57\u7b26 and \u65e5\u672c\u8a9e",
    "emoji \U0001F600\U0001F680 x\U0001F44D\U0001F3FDy",
    "typographic \u201cquotes\u201d and \u2018apostrophes\u2019 \u2014 dashes",
    "control \x01\x02 bytes \x7f and \u00a0nbsp",
    "<unk> and <|start_story|> and <|end_story|> inside",
    "x<|end_story|>y",
    "She said, \"Let's go!\" He said: 'No; not yet?'",
    "UPPER lower MiXeD CaSe",
    "a|b_c$d<e>f",
    "\u2581already a metaspace",
    "The end.",
]


def random_strings(n, seed=0):
    rng = random.Random(seed)
    words = ["the", "a", "Lily", "dog", "ran", "happy", "park", "big", "red", "ball", "said",
             "Tim", "was", "to", "and", "play", "tree", "sun", "!", ",", ".", "?", "'", "\""]
    chars = list("abcdefghijklmnopqrstuvwxyzABCXYZ0123456789 .,!?'\"-:;\n") + ["\u00e9", "\u4e2d", "\U0001F600", "\u2019"]
    out = []
    for i in range(n):
        if i % 2:
            k = rng.randint(1, 25)
            s = " ".join(rng.choice(words) for _ in range(k))
        else:
            k = rng.randint(1, 60)
            s = "".join(rng.choice(chars) for _ in range(k))
        out.append(s)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=os.path.join(ROOT, "..", "shared", "data"))
    ap.add_argument("--out", default=os.path.join(ROOT, "tests", "fixtures"))
    args = ap.parse_args()
    model_dir = os.path.join(args.data, "tinystories-656k")
    os.makedirs(args.out, exist_ok=True)
    versions = {"torch": torch.__version__, "transformers": transformers.__version__,
                "tokenizers": tokenizers.__version__, "safetensors": safetensors.__version__}

    # --- tokenizer -------------------------------------------------------------------------
    tok = tokenizers.Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    auto = transformers.AutoTokenizer.from_pretrained(model_dir)
    cases = []
    differ = 0
    for s in STRINGS + random_strings(120):
        ids = tok.encode(s).ids
        t_ids = auto(s)["input_ids"]
        differ += t_ids != ids
        cases.append({"text": s, "ids": ids, "decoded": tok.decode(ids, skip_special_tokens=False),
                      "transformers_ids": t_ids,
                      "transformers_decoded": auto.decode(t_ids, skip_special_tokens=False)})
    rng = random.Random(1)
    decode_cases = []
    for n in [1, 2, 5, 17, 40]:
        for _ in range(3):
            ids = [rng.randrange(tok.get_vocab_size()) for _ in range(n)]
            decode_cases.append({"ids": ids, "text": tok.decode(ids, skip_special_tokens=False)})
    with open(os.path.join(args.out, "tinystories_tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump({"about": "token ids of tokenizers.Tokenizer.from_file(tinystories-656k/tokenizer.json)"
                            ".encode(text).ids and .decode(ids, skip_special_tokens=False); "
                            "transformers_*: AutoTokenizer on the same folder (for information: "
                            "transformers 5.x differs, see examples/train/tokenizer.h)",
                   "versions": versions, "transformers_differs_on": differ,
                   "cases": cases, "decode_cases": decode_cases}, f, ensure_ascii=False, indent=0)
        f.write("\n")
    print(f"tokenizer: {len(cases)} strings ({differ} where transformers {transformers.__version__} "
          f"differs), {len(decode_cases)} decodes")

    # --- model -----------------------------------------------------------------------------
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, torch_dtype=torch.float32, attn_implementation="eager").eval()
    texts = ["Once upon a time, there was a little girl named Lily.", "The dog ran to the park."]
    seqs = [tok.encode(t).ids[:6] for t in texts]
    seqs[1] = seqs[1][:4]
    T = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), T, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
        logits = logits * mask.unsqueeze(-1)  # padded positions are not compared
        story = ("Once upon a time, there was a little boy named Tom. Tom liked to play with his "
                 "red ball in the big park. One day, the ball rolled far away and Tom was sad. "
                 "His friend Sue came and helped him find it. They were happy and played all day. "
                 "The next morning, Tom and Sue went to the lake. They saw a big fish jump out of "
                 "the water! \"Look!\" said Sue. Tom laughed and said, \"Let's try to catch it.\" "
                 "But the fish was too fast, so they sat down and ate some cake instead.")
        long_ids = torch.tensor([tok.encode(story).ids])
        long_logits = model(input_ids=long_ids).logits.float()[0]
        sdpa = transformers.AutoModelForCausalLM.from_pretrained(
            model_dir, torch_dtype=torch.float32, attn_implementation="sdpa").eval()
        sdpa_diff = (sdpa(input_ids=long_ids).logits[0] - long_logits).abs().max().item()
    lse = torch.logsumexp(long_logits, -1)
    target = long_logits[:-1].gather(1, long_ids[0, 1:, None])[:, 0]
    safetensors.torch.save_file(
        {"batch_logits": logits.contiguous(), "long_logsumexp": lse.contiguous(),
         "long_target_logits": target.contiguous(), "long_last_logits": long_logits[-1].contiguous()},
        os.path.join(args.out, "tinystories_logits.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(args.out, "tinystories_model.json"), "w") as f:
        json.dump({"about": "inputs of tinystories_logits.safetensors: LlamaForCausalLM.from_pretrained("
                            "tinystories-656k, float32, eager attention); batch_logits is zero at padding",
                   "versions": versions, "batch_ids": ids.tolist(), "batch_attention_mask": mask.tolist(),
                   "long_ids": long_ids[0].tolist(), "sdpa_vs_eager_max_abs_diff": sdpa_diff}, f)
        f.write("\n")
    print(f"model: batch {list(ids.shape)}, long sequence of {long_ids.shape[1]} tokens, "
          f"sdpa vs eager max |diff| {sdpa_diff:.2e}")


if __name__ == "__main__":
    main()
