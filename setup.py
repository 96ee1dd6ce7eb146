"""Install with torch already present: pip install --no-build-isolation -e .
(--no-build-isolation lets the build see that torch; pyproject.toml names only the build backend.)

Builds the C++ extension dmfn_fast._C (CPU kernels always; CUDA kernels too when
torch has CUDA and a CUDA toolkit is found). DMFN_NO_EXT=1 skips the build; the
package then JIT-builds on first use or falls back to the PyTorch reference.
"""
import os
import sys

from setuptools import setup


def extension_modules():
    if os.environ.get("DMFN_NO_EXT", "") not in ("", "0"):
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:  # an isolated build, or torch not installed yet: say so, build the rest
        print("\n*** dmfn-fast: torch is not importable in this build, so the C++ extension dmfn_fast._C is\n"
              "*** NOT built (the centroid loss then JIT-compiles on first use or uses PyTorch). Install torch\n"
              "*** first, then: pip install --no-build-isolation -e .\n", file=sys.stderr)
        return [], {}
    sources = ["csrc/centroid_align.cpp"]
    cxx = ["-O3", "-g0", "-fopenmp", "-DDMFN_PY_MODULE"]  # -g0: Python's CFLAGS add -g, slow to build
    kwargs = dict(extra_link_args=["-fopenmp"])
    if torch.version.cuda and cpp_extension.CUDA_HOME:
        sources += ["csrc/centroid_align_cuda.cpp", "csrc/centroid_align_kernel.cu"]
        ext = cpp_extension.CUDAExtension(
            "dmfn_fast._C", sources,
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]}, **kwargs)
    else:
        ext = cpp_extension.CppExtension("dmfn_fast._C", sources, extra_compile_args={"cxx": cxx}, **kwargs)
    return [ext], {"build_ext": cpp_extension.BuildExtension}


ext_modules, cmdclass = extension_modules()

setup(
    name="dmfn-fast",
    version="0.1.0",
    description="DMFN image inpainting with fused Triton and C++/CUDA kernels",
    python_requires=">=3.10",
    # kernels/ and csrc/ stay at the top of the repository; installed, they are dmfn_fast/kernels (the
    # Triton kernels, a package) and dmfn_fast/csrc (the C++/CUDA sources, data: the centroid op's JIT
    # build compiles them when the install did not build dmfn_fast._C).
    packages=["dmfn_fast", "dmfn_fast.ops", "dmfn_fast.training", "dmfn_fast.kernels", "dmfn_fast.csrc"],
    package_dir={"dmfn_fast.kernels": "kernels", "dmfn_fast.csrc": "csrc"},
    package_data={"dmfn_fast.csrc": ["*.cpp", "*.cu", "*.h"]},
    install_requires=["torch>=2.5", "numpy", "pillow"],
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={
        "console_scripts": [
            "dmfn-inpaint=dmfn_fast.inpaint:main",
            "dmfn-eval=dmfn_fast.evaluate:main",
            "dmfn-export=dmfn_fast.export:main",
        ]
    },
    extras_require={
        "triton": ["triton>=3.1,<3.8"],
        "train": ["scikit-image", "tqdm", "pyyaml", "matplotlib"],
        "eval": ["torchmetrics>=1.0"],
        "export": ["onnx", "onnxscript", "onnxruntime"],
        "test": ["pytest", "pytest-benchmark", "scikit-image", "tqdm", "pyyaml", "matplotlib",
                 "torchmetrics>=1.0", "onnx", "onnxscript", "onnxruntime"],
    },
)
