"""Build jsigr_fast and its one C++ extension, ``jsigr_fast._C``.

The CPU kernels in ``csrc/*.cpp`` are always built. The CUDA kernels in ``csrc/cuda/*.cu``
are added only when the installed torch was built with CUDA *and* nvcc is found: we key off
``torch.version.cuda`` and ``CUDA_HOME``, not ``torch.cuda.is_available()``, so a GPU-less
build box with a CUDA torch still compiles them (pytorch/extension-cpp does the same).

Install with ``pip install --no-build-isolation -e .``: the build imports the torch that is
already installed. Without ``--no-build-isolation`` pip would build in an empty environment
(and, if it found a torch requirement, pull a multi-GB CUDA wheel). ``JSIGR_NO_EXT=1`` skips the
extension entirely (the package then runs on pure PyTorch); ``DEBUG=1`` builds with -O0 -g.
"""
import glob
import os

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError as exc:  # pragma: no cover - only hit on a misconfigured install
    raise SystemExit(
        "jsigr_fast's build needs torch to be installed first, and pip must not isolate the build:\n"
        "    pip install torch && pip install --no-build-isolation -e .\n"
        f"(import error: {exc})"
    )

HERE = os.path.dirname(os.path.abspath(__file__))


def extensions():
    if os.environ.get("JSIGR_NO_EXT", "0") == "1":
        return []
    debug = os.environ.get("DEBUG", "0") == "1"
    cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    use_cuda = torch.version.cuda is not None and CUDA_HOME is not None and os.environ.get("JSIGR_NO_CUDA", "0") != "1"
    cxx = ["-O0", "-g"] if debug else ["-O3", "-fopenmp"]
    extra = {"cxx": cxx + ["-std=c++20"]}
    if use_cuda:
        extra["nvcc"] = (["-O0", "-g", "-G"] if debug else ["-O3", "--use_fast_math"]) + ["-std=c++20"]
        return [CUDAExtension("jsigr_fast._C", cpp_sources + cuda_sources, extra_compile_args=extra,
                              extra_link_args=["-fopenmp"])]
    return [CppExtension("jsigr_fast._C", cpp_sources, extra_compile_args=extra,
                         extra_link_args=["-fopenmp"])]


setup(
    name="jsigr_fast",
    version="0.1.0",
    description="Gradient-based robustness regularization (J-SIGR, Jacobian regularization, double backprop, "
    "JARN, Interpretation Regularization) for PyTorch, with fused kernels",
    long_description=open(os.path.join(HERE, "README.md")).read() if os.path.exists(os.path.join(HERE, "README.md")) else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    # Triton kernels live in the top-level kernels/ folder but are installed inside our namespace,
    # as jsigr_fast.kernels, never as a top-level module called "kernels".
    packages=find_packages(include=["jsigr_fast", "jsigr_fast.*"]) + ["jsigr_fast.kernels"],
    package_dir={"jsigr_fast": "jsigr_fast", "jsigr_fast.kernels": "kernels"},
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    install_requires=["numpy", "tqdm"],
    extras_require={
        "triton": ["triton"],
        "demo": ["scikit-learn", "matplotlib"],
        "test": ["pytest", "pytest-benchmark", "scikit-learn", "matplotlib", "pyyaml"],
    },
    entry_points={"console_scripts": ["jsigr-fast=jsigr_fast.cli:main"]},
)
