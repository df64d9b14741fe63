"""Install openfl_api: ``pip install -e .`` (``pip install -e .[test]`` for the test suite)."""

from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
requirements = [line.strip() for line in (here / "requirements.txt").read_text().splitlines() if line.strip()]

setup(
    name="openfl_api",
    version="0.1.0",
    description="Federated learning for PyTorch: one training loop on every rank, versioned state_dicts over torch.distributed",
    long_description=(here / "README.md").read_text(encoding="utf-8") if (here / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["openfl_api", "openfl_api.*"]),
    python_requires=">=3.9",
    install_requires=requirements,
    extras_require={
        "test": ["pytest>=7", "pytest-timeout>=2", "hypothesis>=6", "matplotlib>=3.5", "scikit-learn>=1.0",
                 "tensorboard>=2", "tqdm>=4", "opacus>=1.5", "cryptography>=41"],
        "docs": ["sphinx>=7"],
        "plot": ["matplotlib>=3.5"],
        "digits": ["scikit-learn>=1.0"],
        "tensorboard": ["tensorboard>=2"],
        "progress": ["tqdm>=4"],
        # DP accounting and local DP-SGD (opacus), secure aggregation (cryptography): openfl_api.transforms
        "privacy": ["opacus>=1.5", "cryptography>=41"],
    },
)
