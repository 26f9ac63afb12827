"""davir-jax: DavIR data selection, SFT and DavIR-DPO in JAX / Flax NNX."""

from setuptools import find_packages, setup

setup(
    name="davir-jax",
    version="0.1.0",
    description="Data selection via implicit reward (DavIR, arXiv 2310.13008) in JAX for TPU/GPU",
    packages=find_packages(include=["davir_jax", "davir_jax.*"]),
    # The demo's real data (davir_jax/demo/data: rows, licenses, provenance).
    package_data={"davir_jax.demo": ["data/*"]},
    python_requires=">=3.10",
    # Compatible ranges; requirements.lock pins the exact set CI and the README commands install.
    install_requires=[
        "jax>=0.10.2,<0.11",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.8,<0.3",
        "orbax-checkpoint>=0.12.8,<0.13",
        "transformers>=5.24,<6",
        "tensorflow-datasets>=4.9.10,<5",
        "array_record>=0.8,<0.9",  # the token store writes it directly (data/storage.py)
        "importlib_resources>=6",
        "gguf>=0.19,<0.20",
        "safetensors>=0.8,<0.9",
        "tokenizers>=0.23,<0.24",
        "numpy>=2.0",
        "pyyaml>=6",
        "tqdm>=4.66",
        "pyarrow>=15",
        "matplotlib>=3.8",
        "scipy>=1.10",
        "tensorboardX>=2.6,<3",
        # gs:// paths (core/storage.py); 2026.10 is the first gcsfs that fits fsspec 2026.9.
        "fsspec>=2026.9",
        "gcsfs>=2026.10,<2027",
    ],
    extras_require={
        # torch 2.13.0 is the CPU build from the machine's wheel store: a newer range resolves to a
        # multi-GB CUDA build. accelerate is what transformers' GGUF loader (our oracle) needs.
        "test": [
            "pytest>=8",
            "pytest-xdist>=3.5",
            "torch==2.13.0",
            "accelerate>=1.0",
            "ruff>=0.6",
            "gcp-storage-emulator>=2026.7",  # a GCS API on loopback for the gs:// tests
        ],
    },
    entry_points={"console_scripts": ["davir=davir_jax.cli:main"]},
)
