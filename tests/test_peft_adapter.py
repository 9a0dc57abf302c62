"""PEFT round trip against peft itself (torch, float32): the adapters we export load in
``PeftModel.from_pretrained`` with our logits, a peft-made adapter loads in ours with peft's logits,
and the PEFT options we do not implement are refused by name."""

import json
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import left_padded_batch, torch_logits

from sail_jax.models import load_pretrained
from sail_jax.models.lora import DEFAULT_TARGETS, adapted_layers, add_lora
from sail_jax.models.peft_adapter import AdapterError, load_adapter, save_adapter

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _randomize_adapters(model, seed=1):
    """Trained-looking adapters: B ≠ 0, so the adapted logits differ from the base's."""
    key = jax.random.key(seed)
    for i, (_, layer) in enumerate(adapted_layers(model, r"")):
        if layer.lora is not None:
            ka, kb = jax.random.split(jax.random.fold_in(key, i))
            layer.lora.a[...] = 0.3 * jax.random.normal(ka, layer.lora.a.shape)
            layer.lora.b[...] = 0.3 * jax.random.normal(kb, layer.lora.b.shape)


def _batch(model):
    ids, mask = left_padded_batch(model.config.vocab_size, 3, 10, pad_id=model.config.pad_token_id)
    return ids, mask


def _hf(path, cls="AutoModelForCausalLM", **kwargs):
    import torch
    import transformers

    return getattr(transformers, cls).from_pretrained(path, dtype=torch.float32, **kwargs).eval()


@pytest.mark.parametrize("targets", [DEFAULT_TARGETS, r"layers\.1\.self_attn\.(q_proj|o_proj)$"])
def test_our_adapter_export_loads_in_peft_with_our_logits(tiny_checkpoint, tmp_path, targets):
    from peft import PeftModel

    model = load_pretrained(tiny_checkpoint)
    ids, mask = _batch(model)
    base = np.asarray(model(ids, mask))
    add_lora(model, rank=4, alpha=8.0, targets=targets)
    _randomize_adapters(model)
    ours = np.asarray(model(ids, mask))
    save_adapter(model, str(tmp_path / "adapter"), base_model=tiny_checkpoint)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["target_modules"] == (sorted(PROJECTIONS) if targets == DEFAULT_TARGETS
                                        else r"^(model\.layers\.1\.self_attn\.o_proj|model\.layers\.1\.self_attn\.q_proj)$")
    theirs = torch_logits(PeftModel.from_pretrained(_hf(tiny_checkpoint), str(tmp_path / "adapter")).eval(), ids, mask)
    real = mask.astype(bool)
    assert np.abs(ours - base)[real].max() > 0.05  # the adapters matter
    np.testing.assert_allclose(ours[real], theirs[real], atol=1e-4, rtol=0)


def test_a_peft_made_adapter_loads_in_ours_with_peft_logits(tiny_checkpoint, tmp_path):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(_hf(tiny_checkpoint), LoraConfig(r=4, lora_alpha=8, target_modules=PROJECTIONS,
                                                                  init_lora_weights=False, lora_dropout=0.0)).eval()
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    model = load_pretrained(tiny_checkpoint)
    ids, mask = _batch(model)
    theirs = torch_logits(peft_model, ids, mask)
    assert load_adapter(model, str(tmp_path / "adapter"), rank=4, alpha=8.0, targets=DEFAULT_TARGETS) == 14
    ours = np.asarray(model(ids, mask))
    real = mask.astype(bool)
    assert np.abs(ours - torch_logits(_hf(tiny_checkpoint), ids, mask))[real].max() > 0.05
    np.testing.assert_allclose(ours[real], theirs[real], atol=1e-4, rtol=0)
    # Round trip: what we write back is what peft wrote (same names, same values).
    from safetensors.numpy import load_file

    save_adapter(model, str(tmp_path / "again"))
    a, b = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("adapter", "again"))
    assert a.keys() == b.keys() and all(np.allclose(a[k], b[k], atol=1e-7) for k in a)


def test_a_reward_model_adapter_and_its_head_load_in_peft(tiny_checkpoint, tmp_path):
    """A sequence classifier: adapters plus the trained score head (PEFT's modules_to_save)."""
    import torch
    from peft import PeftModel

    model = load_pretrained(tiny_checkpoint, task="sequence_classification", head_seed=3)
    add_lora(model, rank=4, alpha=8.0)
    _randomize_adapters(model)
    ids = np.random.RandomState(0).randint(3, model.config.vocab_size, (3, 9)).astype(np.int32)
    mask = np.ones_like(ids)
    ours = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    save_adapter(model, str(tmp_path / "adapter"), base_model=tiny_checkpoint)
    hf = _hf(tiny_checkpoint, "AutoModelForSequenceClassification", num_labels=1)
    peft_model = PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        theirs = peft_model(torch.tensor(ids).long(), attention_mask=torch.tensor(mask).long()).logits[:, 0].numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


def test_adapters_peft_cannot_mean_the_same_here_are_refused(tiny_checkpoint, tmp_path):
    model = load_pretrained(tiny_checkpoint)
    add_lora(model, rank=4, alpha=8.0)
    save_adapter(model, str(tmp_path / "a"))
    with pytest.raises(AdapterError, match=re.escape("set --config.lora.rank=4")):
        load_adapter(load_pretrained(tiny_checkpoint), str(tmp_path / "a"), rank=8, alpha=8.0, targets=DEFAULT_TARGETS)
    with pytest.raises(AdapterError, match="only in the file"):
        load_adapter(load_pretrained(tiny_checkpoint), str(tmp_path / "a"), rank=4, alpha=8.0, targets="q_proj$")
    shutil.copytree(tmp_path / "a", tmp_path / "dora")
    config = json.loads((tmp_path / "dora" / "adapter_config.json").read_text())
    (tmp_path / "dora" / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(AdapterError, match=re.escape("use_dora=True is not supported")):
        load_adapter(load_pretrained(tiny_checkpoint), str(tmp_path / "dora"), rank=4, alpha=8.0,
                     targets=DEFAULT_TARGETS)
    with pytest.raises(AdapterError, match="no adapter_config.json there"):
        load_adapter(load_pretrained(tiny_checkpoint), str(tmp_path), rank=4, alpha=8.0, targets=DEFAULT_TARGETS)
