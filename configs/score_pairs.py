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
    # path: JSONL of {prompt, chosen, rejected}; rows longer than the lengths raise naming file:line,
    # or with on_error="skip" are left out and listed.
    config.data = ml_collections.ConfigDict({"path": "", "max_prompt_length": 512, "max_length": 1024,
                                             "on_error": "raise"})
    config.loss = ml_collections.ConfigDict({"loss_type": "sigmoid", "beta": 0.1})
    return config
