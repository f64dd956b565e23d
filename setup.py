"""Builds ultra_fast._C (the native ops, torch.ops.ultra_fast.*) from csrc/.

    pip install --no-build-isolation -e .

- CPU kernels are always built (OpenMP + -O3).
- CUDA kernels are added when this torch is a CUDA build and a CUDA toolkit is found
  (``CUDA_HOME``, torch's guess, or /usr/local/cuda). ``ULTRA_FAST_FORCE_CPU=1`` skips them.
- With a toolkit but no visible GPU and no ``TORCH_CUDA_ARCH_LIST``, the arch list defaults
  to ``8.0;9.0+PTX`` (torch's build cannot guess one without a GPU).
- ``ULTRA_FAST_DEBUG=1`` builds with -O0 -g.

The extension is built against the torch already installed (hence --no-build-isolation).
"""
from __future__ import annotations

import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join("csrc")


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _find_cuda_home(torch_cuda_home: str | None) -> str | None:
    """A CUDA toolkit root with nvcc and the runtime headers, or None."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), torch_cuda_home,
                  "/usr/local/cuda"]
    nvcc = "nvcc.exe" if sys.platform == "win32" else "nvcc"
    for root in candidates:
        if root and os.path.isfile(os.path.join(root, "bin", nvcc)) and os.path.isfile(
                os.path.join(root, "include", "cuda_runtime.h")):
            return root
    return None


def _extensions():
    import torch
    from torch.utils import cpp_extension

    debug = _truthy("ULTRA_FAST_DEBUG")
    force_cpu = _truthy("ULTRA_FAST_FORCE_CPU")

    cuda_home = None
    if torch.version.cuda is not None and not force_cpu:
        cuda_home = _find_cuda_home(cpp_extension.CUDA_HOME)
    with_cuda = cuda_home is not None

    sources = sorted(glob.glob(os.path.join(CSRC, "*.cpp")))
    sources += sorted(glob.glob(os.path.join(CSRC, "cpu", "*.cpp")))
    if with_cuda:
        sources += sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu")))

    # (py_limited_api=True below makes torch define Py_LIMITED_API itself.)
    define_macros = [("ULTRA_FAST_PYTHON_MODULE", None)]
    if sys.platform == "win32":
        cxx = ["/O2", "/openmp", "/std:c++17"] if not debug else ["/Od", "/Zi", "/openmp"]
        link = []
    elif sys.platform == "darwin":  # Apple clang has no -fopenmp: single-threaded kernels
        cxx = ["-O0", "-g"] if debug else ["-O3"]
        link = []
    else:
        cxx = (["-O0", "-g"] if debug else ["-O3"]) + ["-fopenmp"]
        link = ["-fopenmp"]
    extra_compile_args = {"cxx": cxx}

    if with_cuda:
        # torch.utils.cpp_extension reads its module-level CUDA_HOME (nvcc path, include and
        # library dirs); point it at the toolkit found above (torch's own guess can be a
        # wrapper-script directory such as /usr/local).
        cpp_extension.CUDA_HOME = cuda_home
        os.environ["CUDA_HOME"] = cuda_home
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"
        define_macros.append(("WITH_CUDA", None))
        extra_compile_args["nvcc"] = (["-O0", "-g", "-G"] if debug else ["-O3"]) + [
            "-DWITH_CUDA", "-DULTRA_FAST_PYTHON_MODULE"]
        ext_cls = cpp_extension.CUDAExtension
    else:
        ext_cls = cpp_extension.CppExtension

    print(f"ultra_fast: building backends cpu{' + cuda (' + cuda_home + ')' if with_cuda else ''}"
          f"; TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', '')!r}",
          file=sys.stderr)
    return [
        ext_cls(
            "ultra_fast._C",
            sources,
            include_dirs=[os.path.join(ROOT, CSRC)],
            define_macros=define_macros,
            extra_compile_args=extra_compile_args,
            extra_link_args=link,
            py_limited_api=True,
        )
    ]


def _cmdclass():
    from torch.utils.cpp_extension import BuildExtension

    return {"build_ext": BuildExtension.with_options(no_python_abi_suffix=True, use_ninja=True)}


setup(
    ext_modules=_extensions(),
    cmdclass=_cmdclass(),
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
