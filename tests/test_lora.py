"""LoRA: fresh adapters are the base model, only adapters train, the frozen base is the reference
(no copy), a sharded step equals one device, and a LoRA DPO run learns, resumes exactly and exports
the merged model."""

import json
import os
import re
import subprocess

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import dpo_command, synthetic_pairs, write_jsonl
from flax import nnx
from safetensors.numpy import load_file

from sail_jax.configs import base_config
from sail_jax.data.pipeline import encode_preference
from sail_jax.data.records import Records
from sail_jax.models import load_pretrained
from sail_jax.models.lora import add_lora, merge_lora
from sail_jax.models.quantize import quantize_model
from sail_jax.objectives import make_dpo_objective
from sail_jax.optim import make_optimizer
from sail_jax.sharding import bytes_per_device, make_mesh, shard_batch, sharding_fn
from sail_jax.tokenization import Tokenizer
from sail_jax.train import create_adapter_train_state, create_train_state, frozen_copy, make_train_step

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ids():
    ids = jnp.asarray(np.random.RandomState(0).randint(3, 100, size=(2, 9)), jnp.int32)
    return ids, jnp.ones_like(ids).at[0, :3].set(0)


def test_fresh_adapters_are_the_base_model_and_merging_folds_trained_ones(tiny_checkpoint):
    model = load_pretrained(tiny_checkpoint)
    ids, mask = _ids()
    base_logits = model(ids, mask)
    base_graphdef = nnx.graphdef(model)
    assert add_lora(model, rank=4, alpha=8.0) == 2 * 7  # q k v o gate up down in 2 layers
    np.testing.assert_array_equal(model(ids, mask), base_logits)  # B = 0: exactly the base
    graphdef, adapters, base = nnx.split(model, nnx.LoRAParam, ...)
    trained = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.key(1), x.shape), adapters)
    adapted = nnx.merge(graphdef, trained, base)(ids, mask)
    assert float(jnp.abs(adapted - base_logits).max()) > 0.05
    np.testing.assert_array_equal(nnx.merge(base_graphdef, base)(ids, mask), base_logits)  # adapters off
    merged = merge_lora(nnx.merge(graphdef, trained, base))
    assert not list(nnx.to_flat_state(nnx.state(merged, nnx.LoRAParam)))
    np.testing.assert_allclose(merged(ids, mask), adapted, atol=2e-5)
    with pytest.raises(ValueError, match="matches no projection"):
        add_lora(load_pretrained(tiny_checkpoint), rank=4, alpha=8.0, targets="nothing_here")


def _dpo_step(tiny_checkpoint, mesh_shape, lora: bool, quantize: str = ""):
    """One SGD DPO step (with LoRA: adapters B ≠ 0 so gradients reach A too; ``quantize``: over a QLoRA
    base); loss, new trainable state."""
    mesh = make_mesh(mesh_shape, jax.devices()[: int(np.prod(mesh_shape))])
    config = base_config("dpo")
    config.optim.update(name="sgd", learning_rate=0.1, schedule="constant")
    tx = make_optimizer(config.optim, 10)
    model = load_pretrained(tiny_checkpoint, shardings=sharding_fn(mesh))
    if quantize:
        quantize_model(model, quantize)
    base_graphdef = nnx.graphdef(model)
    if lora:
        add_lora(model, rank=4, alpha=8.0)
        for _, module in nnx.iter_graph(model):  # B = 0.01 (not 0): both factors get gradients
            if hasattr(module, "b") and isinstance(module.b, nnx.LoRAParam):
                module.b[...] = jnp.full(module.b.shape, 0.01, jnp.float32)
        graphdef, state, shardings, base, base_shardings = create_adapter_train_state(model, tx, mesh)
        frozen, frozen_shardings = {"base": base, "reference": base}, {"base": base_shardings,
                                                                       "reference": base_shardings}
    else:
        graphdef, state, shardings = create_train_state(model, tx, mesh)
        frozen = {"reference": frozen_copy(state.params, shardings.params)}
        frozen_shardings = {"reference": shardings.params}
    enc = encode_preference(Records(synthetic_pairs(8)), Tokenizer.from_pretrained(tiny_checkpoint),
                            max_prompt_length=40, max_length=48)
    step = make_train_step(graphdef, tx, make_dpo_objective(config.loss, base_graphdef, "model"), mesh, shardings,
                           frozen_shardings, seed=0)
    before = jax.device_get(frozen)
    state, metrics = step(state, shard_batch(enc.arrays, mesh), frozen)
    return float(metrics["loss"]), jax.device_get(state.params), state, frozen, before


def test_only_the_adapters_train_and_the_base_is_the_reference_without_a_copy(tiny_checkpoint):
    loss, params, state, frozen, before = _dpo_step(tiny_checkpoint, (1, 1, 1), lora=True)
    names = [".".join(map(str, path)) for path, _ in nnx.to_flat_state(params)]
    assert names and all(".lora.a" in n or ".lora.b" in n for n in names), names
    assert frozen["reference"] is frozen["base"]  # one copy of the base serves both
    chex.assert_trees_all_equal(jax.device_get(frozen["base"]), before["base"])  # frozen: untouched
    assert loss != pytest.approx(np.log(2), abs=1e-6)  # B ≠ 0: the policy already differs from the base
    # Memory: policy + reference + optimizer state (adamw), full training vs LoRA, on this tiny model.
    tx = make_optimizer(base_config("dpo").optim, 10)
    mesh = make_mesh((1, 1, 1), jax.devices()[:1])
    _, full, _ = create_train_state(load_pretrained(tiny_checkpoint), tx, mesh)
    model = load_pretrained(tiny_checkpoint)
    add_lora(model, rank=4, alpha=8.0)
    _, adapters, _, base, _ = create_adapter_train_state(model, tx, mesh)

    def total(*trees):
        return sum(sum(bytes_per_device(t).values()) for t in trees)

    full_bytes = total(full.params, full.opt_state, full.params)  # the reference is a second copy
    lora_bytes = total(adapters.params, adapters.opt_state, base)  # the base is policy and reference
    assert lora_bytes < 0.45 * full_bytes, (lora_bytes, full_bytes)


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (1, 8, 1), (2, 2, 2)])
def test_a_sharded_lora_step_equals_one_device(tiny_checkpoint, mesh_shape):
    loss1, params1, *_ = _dpo_step(tiny_checkpoint, (1, 1, 1), lora=True)
    loss8, params8, *_ = _dpo_step(tiny_checkpoint, mesh_shape, lora=True)
    assert abs(loss8 - loss1) < 1e-5
    chex.assert_trees_all_close(params8, params1, atol=1e-5, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("quantize", ["", "nf4"])  # LoRA, and QLoRA over an NF4 base
def test_lora_dpo_learns_resumes_exactly_and_exports_the_merged_model(tiny_checkpoint, tmp_path, quantize):
    train = write_jsonl(tmp_path / "train.jsonl", synthetic_pairs(64, 1))
    evalp = write_jsonl(tmp_path / "eval.jsonl", synthetic_pairs(16, 2))
    lora = ("--config.lora.rank=8", "--config.lora.alpha=16", "--config.lora.dropout=0.1",
            f"--config.lora.quantize={quantize}", "--config.optim.learning_rate=1e-2",
            "--config.optim.schedule=constant",  # the same math for 12 and 24 steps
            "--config.log_every=1", "--config.checkpoint.every=4", "--config.eval_every=100")

    def run(work, steps):
        cmd = dpo_command(work, tiny_checkpoint, train, evalp, *lora, f"--config.steps={steps}")
        out = subprocess.run(cmd, cwd=REPO, env={**os.environ, "XLA_FLAGS": ""}, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-3000:]
        return out

    run(tmp_path / "whole", 24)
    run(tmp_path / "split", 12)
    assert "resuming from step 12 of 24" in run(tmp_path / "split", 24).stderr
    losses = [json.loads(line)["loss"] for line in open(tmp_path / "whole" / "metrics.jsonl") if '"train"' in line]
    assert losses[0] == pytest.approx(np.log(2), abs=1e-6) and losses[-1] < losses[0] - 0.05
    whole, split = (load_file(str(tmp_path / w / "export" / "model.safetensors")) for w in ("whole", "split"))
    assert whole.keys() == split.keys() and all(np.array_equal(whole[k], split[k]) for k in whole)
    base = load_file(os.path.join(tiny_checkpoint, "model.safetensors"))
    q, embed = "model.layers.0.self_attn.q_proj.weight", "model.embed_tokens.weight"
    assert not np.allclose(whole[q], base[q]) and np.array_equal(whole[embed], base[embed])
    assert not any("lora" in k for k in whole)  # a plain model: adapters folded in
    assert whole.keys() == base.keys() and all(whole[k].dtype == base[k].dtype for k in base)  # plain kernels
    # The checkpoint holds the adapters and their optimizer state, not the base.
    config = json.loads((tmp_path / "whole" / "checkpoints" / "run_config.json").read_text())
    assert (config["lora.rank"], config["lora.quantize"]) == (8, quantize)  # the run's identity: a resume cannot change it
    stored = json.loads((tmp_path / "whole" / "checkpoints" / "24" / "state" / "_METADATA").read_text())
    arrays = list(stored["tree_metadata"])  # e.g. "('params', 'model', 'layers', '0', ..., 'lora', 'a', 'value')"
    assert any("'lora'" in a for a in arrays)
    assert not [a for a in arrays if any(f"'{n}'" in a for n in ("kernel", "kernel_scale", "embedding", "scale"))]


@pytest.mark.parametrize("recipe,key,value,message", [
    ("dpo", "dropout", 1.0, "config.lora.dropout=1.0 must be in [0, 1)"),
    ("dpo", "targets", "q_proj(", "is not a regular expression"),
    ("reward", "path", "/no/such/adapter", "config.lora.path='/no/such/adapter': no such folder"),
    ("dpo", "alpha", 0.0, "config.lora.alpha=0.0 must be > 0"),
])
def test_lora_settings_that_cannot_run_fail_before_any_work(tiny_checkpoint, recipe, key, value, message):
    from sail_jax.validation import ConfigError, validate_config

    config = base_config(recipe)
    config.model.path, config.data.train_path = tiny_checkpoint, os.path.join(tiny_checkpoint, "config.json")
    config.lora.rank = 8
    config.lora[key] = value
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate_config(config)
