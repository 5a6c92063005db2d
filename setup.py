"""Build of fastshift and its one compiled extension, ``fastshift._C``.

C++ CPU sources (csrc/*.cpp, csrc/cpu/*.cpp) are always built. CUDA sources (csrc/cuda/*.cu)
are added when the installed torch is a CUDA build and a CUDA toolkit is found.

Environment:
  FASTSHIFT_NO_CUDA=1     skip the CUDA sources (fast local rebuilds)
  FASTSHIFT_FORCE_CUDA=1  fail instead of silently building without CUDA
  TORCH_CUDA_ARCH_LIST    CUDA architectures; defaults to "9.0" (H100/H200) when unset
  CUDA_HOME               CUDA toolkit root; defaults to /usr/local/cuda when it exists
  MAX_JOBS                parallel compile jobs (ninja)

Install after torch is in place, without build isolation (isolation would fetch a second
torch into the build environment):  pip install --no-build-isolation -e .
"""

import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _cuda_toolkit_root():
    """The toolkit to compile with: CUDA_HOME if set, else /usr/local/cuda if it holds nvcc.

    torch's own guess follows ``which nvcc``, which can be a wrapper script outside the
    toolkit; the standard link is the reliable place.
    """
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home:
        return home
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda"
    return None


def cuda_arch_codes(arch_list: str) -> list[int]:
    """The compute capabilities in a TORCH_CUDA_ARCH_LIST ("8.0;9.0a", "8.6+PTX 9.0") as
    major * 10 + minor; an entry with +PTX (JIT-compiled by newer GPUs) as 1000 + that code.
    Entries that are not of the form X.Y (architecture names) are left out."""
    codes = []
    for entry in re.split(r"[;\s,]+", arch_list.strip()):
        m = re.fullmatch(r"(\d+)\.(\d+)[a-z]?(\+PTX)?", entry, flags=re.IGNORECASE)
        if m:
            code = int(m.group(1)) * 10 + int(m.group(2))
            codes.append(code + 1000 if m.group(3) else code)
    return codes


def extensions():
    cuda_root = _cuda_toolkit_root()
    if cuda_root:
        os.environ["CUDA_HOME"] = cuda_root  # must precede the cpp_extension import
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")

    import torch
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    want_cuda = not _truthy("FASTSHIFT_NO_CUDA")
    have_cuda = torch.version.cuda is not None and cuda_root is not None
    if _truthy("FASTSHIFT_FORCE_CUDA") and not have_cuda:
        sys.exit(
            "FASTSHIFT_FORCE_CUDA=1 but no CUDA build is possible: "
            f"torch.version.cuda={torch.version.cuda!r}, CUDA toolkit root={cuda_root!r}"
        )
    use_cuda = want_cuda and have_cuda

    cxx = ["-O3", "-std=c++20", "-DPy_LIMITED_API=0x030b0000"]
    if sys.platform.startswith("linux"):
        cxx += ["-fopenmp"]
    extra = {"cxx": cxx}
    define_macros = []
    include_dirs = []
    if use_cuda:
        # The toolkit may lack cuBLAS/cuSPARSE headers that torch's CUDA headers include; the
        # torch wheel ships them under site-packages/nvidia/cu13/include.
        site = os.path.dirname(os.path.dirname(torch.__file__))
        include_dirs += [p for p in glob.glob(os.path.join(site, "nvidia", "cu*", "include"))]
        major, minor = (torch.version.cuda.split(".") + ["0"])[:2]
        define_macros += [
            ("FASTSHIFT_WITH_CUDA", None),
            ("FASTSHIFT_CUDA_VERSION", str(int(major) * 1000 + int(minor) * 10)),
            ("FASTSHIFT_CUDA_ARCHS",
             ",".join(map(str, cuda_arch_codes(os.environ["TORCH_CUDA_ARCH_LIST"]))) or "0"),
        ]
        extra["nvcc"] = ["-O3", "-std=c++20", "--expt-relaxed-constexpr"]
        ext = CUDAExtension(
            "fastshift._C",
            sources + cuda_sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args=extra,
            extra_link_args=["-fopenmp"] if sys.platform.startswith("linux") else [],
            py_limited_api=True,
        )
    else:
        ext = CppExtension(
            "fastshift._C",
            sources,
            define_macros=define_macros,
            extra_compile_args=extra,
            extra_link_args=["-fopenmp"] if sys.platform.startswith("linux") else [],
            py_limited_api=True,
        )
    print(f"fastshift: building _C with CUDA={'yes' if use_cuda else 'no'}", file=sys.stderr)
    return [ext]


# C++ runtime symbols that must come from the shared libstdc++ that torch uses. A toolchain
# that links libstdc++ statically into the extension gives it a second exception runtime, and
# every C++ error thrown inside fastshift (each argument check) then kills the process with a
# segmentation fault instead of raising RuntimeError (seen on a GPU machine whose default g++
# is such a wrapper; README, "Quick start" and "GPU: one H200").
CXX_RUNTIME = ("__cxa_throw", "__gxx_personality_v0")


def own_cxx_runtime(path):
    """The CXX_RUNTIME symbols that the shared object at ``path`` defines itself (empty when it
    takes them from the shared libstdc++), or None where this cannot be read (no ``nm``, not
    Linux)."""
    nm = shutil.which("nm")
    if nm is None or not sys.platform.startswith("linux"):
        return None
    proc = subprocess.run([nm, "-D", "--defined-only", path], capture_output=True, text=True)
    if proc.returncode != 0:
        return None
    names = {line.split()[-1].split("@")[0] for line in proc.stdout.splitlines() if line.strip()}
    return sorted(names.intersection(CXX_RUNTIME))


def build_ext_class():
    """torch's BuildExtension (ninja) that refuses an extension with its own C++ runtime."""
    from torch.utils.cpp_extension import BuildExtension

    class CheckedBuildExtension(BuildExtension.with_options(use_ninja=True)):
        def build_extension(self, ext):
            super().build_extension(ext)
            path = self.get_ext_fullpath(ext.name)
            own = own_cxx_runtime(path) if os.path.exists(path) else None
            if own:
                os.remove(path)
                sys.exit(
                    f"fastshift: {ext.name} defines its own C++ runtime ({', '.join(own)}): the "
                    f"compiler (CXX={os.environ.get('CXX', 'c++')}, LDFLAGS="
                    f"{os.environ.get('LDFLAGS', '')!r}) links libstdc++ statically, "
                    "so a C++ error inside fastshift would crash the process instead of raising "
                    "RuntimeError. Rebuild with a compiler that links the shared libstdc++, e.g. "
                    "CC=/usr/bin/gcc CXX=/usr/bin/g++.")

    return CheckedBuildExtension


if __name__ == "__main__":
    setup(
        ext_modules=extensions(),
        cmdclass={"build_ext": build_ext_class()},
        options={"bdist_wheel": {"py_limited_api": "cp311"}},
    )
