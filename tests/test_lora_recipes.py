"""LoRA through the CLI in the recipes beyond DPO: a SAIL run (sampling, labelling and evaluation on
the adapted policy, the base as the reference) learns, resumes bitwise, exports the merged model and
a PEFT adapter that agree, and refuses to resume on another base; a reward model trains adapters plus
its new head."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import dpo_command, synthetic_pairs, write_jsonl
from safetensors.numpy import load_file

from sail_jax.models import ModelConfig, build_model, load_pretrained, read_config, save_pretrained
from sail_jax.models.peft_adapter import load_adapter

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "XLA_FLAGS": ""}


def _run(cmd):
    return subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)


def _tensors(work, folder="export"):
    name = "model.safetensors" if folder == "export" else "adapter_model.safetensors"
    return load_file(str(work / folder / name))


def _equal(a, b) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_lora_sail_learns_resumes_exactly_exports_and_refuses_another_base(tiny_checkpoint, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(tiny_checkpoint, base)  # replaced at the end of the test
    train = write_jsonl(tmp_path / "train.jsonl", synthetic_pairs(64, 1))
    evalp = write_jsonl(tmp_path / "eval.jsonl", synthetic_pairs(16, 2))

    def sail(work, steps):
        return _run([sys.executable, "-m", "sail_jax.cli", "--config=configs/sail_pp.py", f"--workdir={work}",
                     f"--config.model.path={base}", f"--config.data.train_path={train}",
                     f"--config.data.eval_path={evalp}", "--config.data.max_prompt_length=40",
                     "--config.data.max_response_length=12",
                     "--config.batch_size=8", "--config.eval_batch_size=16", "--config.eval_every=100",
                     "--config.log_every=1", "--config.checkpoint.every=3", "--config.generation.interval=3",
                     "--config.lora.rank=8", "--config.lora.alpha=16", "--config.lora.dropout=0.05",
                     "--config.optim.learning_rate=1e-2", "--config.optim.schedule=constant",
                     f"--config.steps={steps}"])

    for work, steps in (("whole", 24), ("split", 12)):
        out = sail(tmp_path / work, steps)
        assert out.returncode == 0, out.stderr[-3000:]
    out = sail(tmp_path / "split", 24)
    assert out.returncode == 0 and "resuming from step 12 of 24" in out.stderr, out.stderr[-3000:]
    for folder in ("export", "export_adapter"):
        assert _equal(_tensors(tmp_path / "whole", folder), _tensors(tmp_path / "split", folder)), folder

    # Learning, on held-out pairs: the DPO loss there is −log σ(margin), and it starts at log 2 (margin 0).
    rows = [json.loads(line) for line in open(tmp_path / "whole" / "metrics.jsonl")]
    first, final = [r for r in rows if r["split"] == "eval"]
    assert first["heldout/rewards/margins"] == 0 and first["kl"] == 0  # fresh adapters: the base itself
    assert final["heldout/rewards/margins"] > 0.03 and final["heldout/rewards/accuracies"] >= 0.9, final
    assert 0 < final["kl"] < 5 and final["distinct_2"] > 0.9  # the evaluator saw the adapted policy, healthy

    # The PEFT folder on the base gives the merged export's logits.
    ids = np.random.RandomState(0).randint(3, 100, (2, 12)).astype(np.int32)
    mask = np.ones_like(ids)
    adapted = load_pretrained(str(base))
    load_adapter(adapted, str(tmp_path / "whole" / "export_adapter"), rank=8, alpha=16.0,
                 targets=r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$")
    merged = load_pretrained(str(tmp_path / "whole" / "export"))
    np.testing.assert_allclose(np.asarray(adapted(ids, mask)), np.asarray(merged(ids, mask)), atol=1e-5)

    # Another base under the same model.path: the adapters do not belong to it.
    config: ModelConfig = read_config(str(base))
    save_pretrained(build_model(config, seed=7), str(base))
    out = sail(tmp_path / "whole", 27)
    assert out.returncode == 2 and "holds LoRA adapters trained on a different base model" in out.stderr, out.stderr


@pytest.mark.slow
def test_lora_reward_model_trains_adapters_and_its_new_head(tiny_checkpoint, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", synthetic_pairs(64, 1))
    evalp = write_jsonl(tmp_path / "eval.jsonl", synthetic_pairs(16, 2))
    cmd = dpo_command(tmp_path / "rm", tiny_checkpoint, train, evalp, "--config.lora.rank=8", "--config.steps=30",
                      "--config.optim.learning_rate=1e-2", "--config.log_every=1", "--config.eval_every=100")
    cmd[cmd.index("--config=configs/dpo.py")] = "--config=configs/reward.py"
    out = _run(cmd)
    assert out.returncode == 0, out.stderr[-3000:]
    losses = [json.loads(line)["loss"] for line in open(tmp_path / "rm" / "metrics.jsonl") if '"train"' in line]
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.1, losses
    adapter = _tensors(tmp_path / "rm", "export_adapter")
    assert "base_model.model.score.weight" in adapter  # the head trained beside the adapters
    export = _tensors(tmp_path / "rm")
    base = load_file(os.path.join(tiny_checkpoint, "model.safetensors"))
    np.testing.assert_array_equal(export["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    np.testing.assert_array_equal(export["score.weight"], adapter["base_model.model.score.weight"])
