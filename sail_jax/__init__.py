"""sail-jax: online, self-improving alignment (SAIL) of language models in JAX/Flax."""

import os

# transformers is used here for tokenizers and configs only; its "PyTorch was not found" advice is noise.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

__version__ = "0.1.0"
