"""sail-jax: online, self-improving alignment (SAIL) of language models in JAX/Flax."""

__version__ = "0.1.0"
