"""Install with torch already present: pip install --no-build-isolation -e ."""
from setuptools import setup

setup(
    name="dmfn-fast",
    version="0.1.0",
    description="DMFN image inpainting with fused Triton and C++/CUDA kernels",
    python_requires=">=3.10",
    packages=["dmfn_fast", "dmfn_fast.ops", "dmfn_fast.kernels"],
    package_dir={"dmfn_fast.kernels": "kernels"},
    install_requires=["torch>=2.5", "numpy", "pillow"],
    entry_points={
        "console_scripts": [
            "dmfn-inpaint=dmfn_fast.inpaint:main",
            "dmfn-eval=dmfn_fast.evaluate:main",
            "dmfn-export=dmfn_fast.export:main",
        ]
    },
    extras_require={
        "triton": ["triton>=3.1"],
        "train": ["scikit-image", "tqdm", "pyyaml", "matplotlib"],
        "test": ["pytest", "pytest-benchmark", "scikit-image", "tqdm", "pyyaml", "matplotlib"],
    },
)
