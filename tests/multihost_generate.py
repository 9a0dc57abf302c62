"""Worker for tests/test_multihost.py: sample a fixed batch on a mesh over every process's devices.

    python tests/multihost_generate.py MODEL OUT.npy [COORDINATOR NUM_PROCESSES PROCESS_ID]
"""

import sys

import jax
import numpy as np

from sail_jax import distributed
from sail_jax.models import load_pretrained
from sail_jax.sampling import generate
from sail_jax.sharding import batch_sharding, make_mesh, sharding_fn


def main(model_path, out, *process_args):
    if process_args:
        distributed.initialize(process_args[0], int(process_args[1]), int(process_args[2]))
    mesh = make_mesh({"data": 2, "fsdp": -1, "tensor": 1})
    model = load_pretrained(model_path, shardings=sharding_fn(mesh))
    rng = np.random.RandomState(0)
    ids = rng.randint(3, model.config.vocab_size, (16, 8)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1::2, :3] = 0  # left padding on every other row
    result = generate(model, ids, mask, jax.random.key(7), max_new_tokens=6, temperature=1.0, top_k=20,
                      eos_ids=model.config.eos_token_id, pad_id=0, num_samples=2, batch_sharding=batch_sharding(mesh))
    tokens = np.asarray(distributed.to_host(result.tokens))
    logprobs = np.asarray(distributed.to_host(result.logprobs))
    if distributed.is_main():
        np.savez(out, tokens=tokens, logprobs=logprobs)


if __name__ == "__main__":
    main(*sys.argv[1:])
