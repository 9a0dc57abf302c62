"""The CLI end to end (built-in tiny model)."""

import json
import math
import subprocess
import sys

import pytest


def test_cli_scores_pairs_end_to_end_with_the_builtin_model(tmp_path):
    data = tmp_path / "pairs.jsonl"
    rows = [{"prompt": "What is two plus two?", "chosen": " Four.", "rejected": " Five."},
            {"prompt": [{"role": "user", "content": "Say hello."}], "chosen": "Hello!", "rejected": "No."}]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    workdir = tmp_path / "run"
    subprocess.run([sys.executable, "-m", "sail_jax.cli", "--config=configs/score_pairs.py", f"--workdir={workdir}",
                    f"--config.data.path={data}", "--config.loss.beta=0.5"], check=True, capture_output=True)
    metrics = json.loads((workdir / "metrics.json").read_text())
    # The policy is its own reference: every implicit reward is 0 and DPO's loss is exactly ln 2.
    assert metrics["loss/sigmoid"] == pytest.approx(math.log(2), abs=1e-6)
    assert metrics["rewards/margins"] == 0.0 and metrics["logps/chosen"] < 0
    scores = [json.loads(line) for line in (workdir / "scores.jsonl").read_text().splitlines()]
    assert len(scores) == 2 and scores[1]["prompt"].startswith("<|im_start|>user")
    assert "beta = 0.5" in (workdir / "config.txt").read_text().replace(": ", " = ")
    assert (workdir / "tiny_model" / "config.json").exists()
    # A row longer than data.max_length: an error naming file:line, or (on_error=skip) left out and listed.
    data.write_text(data.read_text() + json.dumps({"prompt": "Hi.", "chosen": " word" * 300, "rejected": "No."}) + "\n")
    cmd = [sys.executable, "-m", "sail_jax.cli", "--config=configs/score_pairs.py", f"--workdir={workdir}",
           f"--config.data.path={data}"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 2 and f"error: {data}:3: prompt + response = " in out.stderr, out.stderr[-2000:]
    out = subprocess.run([*cmd, "--config.data.on_error=skip"], capture_output=True, text=True)
    assert out.returncode == 0 and f"skipped {data}:3: longer than" in out.stdout, out.stderr[-2000:]
    assert len((workdir / "scores.jsonl").read_text().splitlines()) == 2


def test_unknown_recipe_lists_valid_ones():
    from sail_jax.errors import UserError
    from sail_jax.recipes import get_recipe

    with pytest.raises(UserError, match=r"config.recipe='ppo' is unknown; valid: \['dpo', 'reward', 'sail', 'score_pairs', 'sft'\]"):
        get_recipe("ppo")


@pytest.mark.parametrize("recipe", ["dpo", "sail"])
def test_bad_inputs_fail_in_validation_before_any_model_loads_with_one_line_naming_the_fix(tiny_checkpoint, tmp_path,
                                                                                        recipe):
    """Each case stops in ``validate_config`` (the CLI prints the line and exits 2, no traceback)."""
    import shutil

    from conftest import synthetic_pairs, write_jsonl

    from sail_jax.configs import base_config, sail_config
    from sail_jax.errors import UserError
    from sail_jax.validation import validate_config

    pairs = write_jsonl(tmp_path / "pairs.jsonl", synthetic_pairs(4))
    no_tokenizer = tmp_path / "no_tokenizer"
    shutil.copytree(tiny_checkpoint, no_tokenizer)
    (no_tokenizer / "tokenizer.json").unlink()

    def config(**changes):
        c = base_config("dpo") if recipe == "dpo" else sail_config("sail_pp")
        c.model.path, c.data.train_path, c.data.eval_path = tiny_checkpoint, pairs, pairs
        for key, value in changes.items():
            section, name = key.split(".", 1)
            c[section][name] = value
        return c

    cases = [
        (config(**{"model.path": str(no_tokenizer)}),
         rf"config.model.path='{no_tokenizer}' has no tokenizer.json \(sail-jax reads fast tokenizers\): save one"),
        (config(**{"model.tokenizer_path": str(no_tokenizer)}), "config.model.tokenizer_path=.* has no tokenizer.json"),
        (config(**{"optim.name": "adam", "optim.kwargs": {"momentum": 0.9}}),
         r"config.optim.kwargs: \['momentum'\] not accepted by optax.adam \(optim.name='adam'\); valid: \['b1', "),
    ]
    for bad, message in cases:
        with pytest.raises(UserError, match=message):
            validate_config(bad)
    validate_config(config())


def _config_files():
    import os

    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
    return root, sorted(f for f in os.listdir(root) if f.endswith(".py"))


def test_help_lists_recipes_every_shipped_config_and_the_subcommands():
    out = subprocess.run([sys.executable, "-m", "sail_jax.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "recipes (config.recipe): dpo, reward, sail, score_pairs, sft" in out.stdout
    for name in _config_files()[1]:
        assert f"configs/{name}" in out.stdout
    for sub in ("show ", "plan ", "task "):
        assert f"\n  {sub}" in out.stdout
    assert "--config.optim.learning_rate=1e-6" in out.stdout and "sail_jax.run(config, workdir)" in out.stdout


def test_every_key_of_every_shipped_config_has_its_meaning_and_show_prints_them():
    """``sail_jax.config_reference.KEY_DOCS`` explains every key a shipped config has (a new key without a
    line fails here); ``sail-jax show`` prints the resolved config with them, overrides applied."""
    import importlib.util
    import os

    from sail_jax.config_reference import undocumented

    root, names = _config_files()
    for name in names:
        spec = importlib.util.spec_from_file_location(name[:-3], os.path.join(root, name))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        assert undocumented(module.get_config()) == [], name
    out = subprocess.run([sys.executable, "-m", "sail_jax.cli", "show", "--config=configs/dpo.py",
                          "--config.optim.learning_rate=3e-6"], capture_output=True, text=True, timeout=120,
                         cwd=os.path.dirname(root))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "optim.learning_rate = 3e-06" in out.stdout and "# peak learning rate" in out.stdout
    assert "(not documented)" not in out.stdout
