"""``fastshift info`` / ``python -m fastshift.info``: what was built and what is usable."""

from __future__ import annotations

import json
import os
import platform
import sys

import torch

from . import __version__, ops

# op -> the backends with a body for it (the backward of each is a registered op too)
FUSED_OPS = {"dwconv_bn": ["cpu", "cuda", "triton"], "pwconv_bn_relu": ["cpu", "cuda", "triton"],
             "channel_split": ["cpu", "cuda"], "channel_interleave": ["cpu", "cuda"],
             "shuffle_cat": ["cpu", "cuda"], "conv_bn_chain": ["cpu", "cuda", "triton"],
             "conv_bn_chain_eval": ["cpu"],  # (eval without autograd; elsewhere conv_bn_chain)
             # (composed from cat and the shuffle ops on other devices)
             "shuffle_cat_pair": ["cpu"], "shuffle_regroup": ["cpu"],
             "linear": ["cpu"],  # (on CUDA ops.linear runs cuBLAS's matmul)
             "stem_conv_bn_relu": ["cpu"]}  # (elsewhere the stem's modules)


def collect() -> dict:
    """Build and runtime facts as a dict (no GPU is touched unless torch already sees one)."""
    cuda_available = torch.cuda.is_available()
    try:
        import triton  # noqa: F401

        triton_version = triton.__version__
    except Exception:  # triton is optional
        triton_version = None
    return {
        "fastshift": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "extension_built": ops.HAVE_C,
        "extension_error": ops.BUILD_ERROR,
        "extension_cuda": ops.cuda_built(),
        "extension_cuda_version": int(torch.ops.fastshift.cuda_version()) if ops.HAVE_C else 0,
        "extension_cuda_archs": [f"sm_{a % 1000}" + ("+PTX" if a > 1000 else "")
                                 for a in ops.CUDA_ARCHS],
        "cuda_device": torch.cuda.get_device_name(0) if cuda_available else None,
        "backends_usable": ops.available_backends(),
        "backend_env": os.environ.get("FASTSHIFT_BACKEND"),
        "backend_auto_cpu": ops.resolve_backend("auto", torch.device("cpu")),
        "backend_auto_cuda": (ops.resolve_backend("auto", torch.device("cuda"))
                              if cuda_available else None),
        "ops": FUSED_OPS if ops.HAVE_C else {},
        "triton_usable": {"cpu": ops.triton_usable("cpu"), "cuda": ops.triton_usable("cuda")},
        "cpu_threads": torch.get_num_threads(),
        "cpu_kernels": ops.cpu_kernel_level(),
        "cpu_isa_env": os.environ.get("FASTSHIFT_CPU_ISA"),
    }


def report(as_json: bool = False) -> str:
    facts = collect()
    if as_json:
        return json.dumps(facts, indent=2)
    lines = [f"fastshift {facts['fastshift']} (python {facts['python']}, {facts['platform']})",
             f"torch {facts['torch']} (CUDA build: {facts['torch_cuda']}), "
             f"triton {facts['triton']}"]
    if facts["extension_built"]:
        cuda = (f"with CUDA bodies (toolkit {facts['extension_cuda_version']}, for "
                f"{', '.join(facts['extension_cuda_archs']) or 'no known GPU'})"
                if facts["extension_cuda"] else "CPU bodies only")
        lines.append(f"fastshift._C: built, {cuda}")
    else:
        lines.append(f"fastshift._C: NOT built ({facts['extension_error']}); rebuild with: "
                     f"{ops.REBUILD}")
    lines.append(f"GPU: {facts['cuda_device'] or 'none visible'}")
    lines.append(f"backends usable here: {', '.join(facts['backends_usable'])}; "
                 f"auto on CPU -> {facts['backend_auto_cpu']}; "
                 f"FASTSHIFT_BACKEND={facts['backend_env'] or '(unset)'}")
    for name, bodies in facts["ops"].items():
        lines.append(f"op {name}: bodies {', '.join(bodies)} (+ reference)")
    tri = facts["triton_usable"]
    if facts["triton"] is None:
        lines.append("triton backend: not usable (triton not importable)")
    else:
        lines.append("triton backend: " + (
            "usable on CUDA" if tri["cuda"] else "CUDA: no GPU visible") + "; " + (
            "CPU tensors through the interpreter (TRITON_INTERPRET=1, for tests)" if tri["cpu"]
            else "CPU tensors only with TRITON_INTERPRET=1 (interpreter, for tests)"))
    if facts["backend_auto_cuda"]:
        lines.append(f"auto on CUDA -> {facts['backend_auto_cuda']}")
    lines.append(f"CPU threads: {facts['cpu_threads']}")
    if facts["cpu_kernels"] is not None:
        lines.append(f"CPU kernels: {facts['cpu_kernels']}; "
                     f"FASTSHIFT_CPU_ISA={facts['cpu_isa_env'] or '(unset)'}")
    return "\n".join(lines)


def main():
    print(report("--json" in sys.argv[1:]))


if __name__ == "__main__":
    main()
