"""Score preference pairs under a model: log-probs, implicit rewards and the DPO loss.

    sail-jax --config=configs/score_pairs.py --workdir=runs/score \
        --config.model.path=/path/to/hf_model --config.data.path=pairs.jsonl

Empty paths use the built-in tiny model and sample pairs (no downloads).
"""

import ml_collections


def get_config():
    config = ml_collections.ConfigDict()
    config.recipe = "score_pairs"
    config.seed = 0
    config.model = ml_collections.ConfigDict({"path": "", "tokenizer_path": "", "dtype": "float32"})
    config.reference = ml_collections.ConfigDict({"path": ""})  # empty: the policy is its own reference
    config.data = ml_collections.ConfigDict({"path": ""})  # JSONL of {prompt, chosen, rejected}
    config.loss = ml_collections.ConfigDict({"loss_type": "sigmoid", "beta": 0.1})
    config.max_prompt_length = 64
    config.max_length = 128
    return config
