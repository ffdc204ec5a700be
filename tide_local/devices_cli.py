"""`tide devices`: the backends and devices of the loaded libggml, and which one runs the model."""

from __future__ import annotations

import argparse
import json
import sys

from tide_local.units import human_bytes

DESCRIPTION = """\
List the compute devices of the libggml tide-local loaded (llama-cpp-python's, or the build in
$TIDE_GGML_LIB_DIR): name, kind, memory free and total, and the one `--device auto` takes (the
first GPU; a CPU-type device such as Vulkan on lavapipe only when named). Without a GPU the
engine runs everything on the CPU, and this says how to get a GPU build."""

NO_GPU = """\
no GPU in this libggml ({lib_dir}): models run on the CPU (--device auto), or on the emulated
device (--device emulated) to study the offload. For a GPU, rebuild llama-cpp-python's libggml
with its backend (same version, 0.3.36), outside pip's wheel cache:
  NVIDIA (CUDA):   CMAKE_ARGS="-DGGML_CUDA=on" pip install --force-reinstall --no-cache-dir llama-cpp-python==0.3.36
  AMD/Intel/NVIDIA (Vulkan, needs Vulkan headers >= 1.4 and glslc):
                   CMAKE_ARGS="-DGGML_VULKAN=on" pip install --force-reinstall --no-cache-dir llama-cpp-python==0.3.36
  Apple (Metal):   CMAKE_ARGS="-DGGML_METAL=on" pip install --force-reinstall --no-cache-dir llama-cpp-python==0.3.36
or point TIDE_GGML_LIB_DIR at a folder with such a build's libggml*.so (see README "With a GPU")."""


def build_parser(prog: str = "tide devices") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print the library and its devices as JSON")
    return p


def main(argv: list[str] | None = None, prog: str = "tide devices") -> int:
    args = build_parser(prog).parse_args(argv)
    from tide_local import ggml

    info = ggml.library_info()
    accelerators = ggml.accelerator_devices()
    auto = accelerators[0].name if accelerators else "cpu"
    if args.json:
        print(json.dumps({**info, "auto": auto}, indent=1))
        return 0
    print(f"libggml {info['version']} ({info['commit']}) from {info['lib_dir']}")
    width = max((len(d["name"]) for d in info["devices"]), default=4)
    for d in info["devices"]:
        free, total = d["memory"]
        memory = f"{human_bytes(free)} free of {human_bytes(total)}" if total else "memory not reported"
        mark = "  <- --device auto" if d["name"].lower() == auto.lower() else ""
        print(f"  {d['name']:<{width}}  {d['type']:<6} {memory:<28} {d['description']}{mark}")
    if not accelerators:
        print(NO_GPU.format(lib_dir=info["lib_dir"]), file=sys.stderr)
    return 0
