"""Run by tests/test_plan.py in a fresh process (XLA flags must precede jax): prints, as JSON, the
planner's train-step bytes per device next to the compiled train step's, for tiny models on 1 or 8
CPU devices (full training and LoRA), and the plan of a 64-layer, FSDP-sharded stand-in to check linear extrapolation."""

import json
import os
import sys

os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "0"  # the memory of the program users compile
os.environ["XLA_FLAGS"] = ("--xla_force_host_platform_device_count=8 "
                           "--xla_cpu_enable_concurrency_optimized_scheduler=false")

import jax  # noqa: E402

from sail_jax.configs import base_config, sail_config  # noqa: E402
from sail_jax.models import ModelConfig, build_model  # noqa: E402
from sail_jax.plan import make_plan, measured_train_step_bytes  # noqa: E402
from sail_jax.sharding import make_mesh  # noqa: E402

# (recipe, mesh, remat, clip_norm, LoRA rank)
CASES = [("dpo", (1, 1, 1), "none", 1.0, 0), ("sail", (1, 8, 1), "none", 1.0, 0), ("sft", (2, 2, 2), "none", 1.0, 0),
         ("dpo", (8, 1, 1), "full", 0.0, 0), ("dpo", (8, 1, 1), "none", 0.0, 0), ("dpo", (1, 1, 1), "none", 1.0, 8),
         ("sail", (1, 8, 1), "none", 1.0, 8), ("dpo", (8, 1, 1), "none", 0.0, 8)]


def main():
    rows = []
    for recipe, mesh, remat, clip, rank in CASES[: int(sys.argv[1]) if len(sys.argv) > 1 else None]:
        config = sail_config("sail_pp") if recipe == "sail" else base_config(recipe)
        config.mesh = dict(zip(("data", "fsdp", "tensor"), mesh))
        config.batch_size, config.optim.clip_norm, config.lora.rank = 16, clip, rank
        if recipe == "sail":
            config.data.max_prompt_length, config.data.max_response_length = 64, 64
        else:
            config.data.max_prompt_length, config.data.max_length = 64, 128
        model_config = ModelConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=4, num_heads=4,
                                   num_kv_heads=2, head_dim=32, remat=remat)
        devices = mesh[0] * mesh[1] * mesh[2]
        plan = make_plan(config, num_devices=devices, model_config=model_config)
        measured = measured_train_step_bytes(config, build_model(model_config), make_mesh(mesh, jax.devices()[:devices]))
        rows.append({"case": f"{recipe} mesh={mesh} remat={remat} clip={clip}" + (f" lora={rank}" if rank else ""), "plan": plan.phases["train step"],
                     "measured": measured, "activations": plan.rows[f"activations (remat={remat})"]})
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
