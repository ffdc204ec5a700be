#!/usr/bin/env bash
# Build the pinned ggml (the llama.cpp sources vendored in the llama-cpp-python sdist that
# tide-local declares its ctypes layer against) with an accelerator backend, into a cache
# folder outside the checkout, and print the folder to use as TIDE_GGML_LIB_DIR.
#
#   scripts/build_ggml.sh vulkan            # build (or reuse) and print the lib folder
#   export TIDE_GGML_LIB_DIR="$(scripts/build_ggml.sh vulkan)"
#   GGML_VK_VISIBLE_DEVICES=0 python -m pytest tests/test_device_backend.py   # lavapipe
#   scripts/build_ggml.sh cuda              # NVIDIA: the local GPU's architecture only
#   scripts/build_ggml.sh cpu               # the CPU backend alone (llama-cpp-python's own build)
#   scripts/build_ggml.sh sources           # only fetch and unpack the sources; print their folder
#
# Options (environment):
#   TIDE_GGML_BUILD_ROOT  where builds live (default: ${TIDE_CACHE_DIR:-${XDG_CACHE_HOME:-~/.cache}/tide-local}/ggml)
#   TIDE_GGML_JOBS        parallel build jobs (default: the cores this process may use)
#   TIDE_GGML_NO_APT=1    never apt-get: fail with the missing packages' names instead
#   TIDE_GGML_SOURCES     a ggml source folder to build from instead of downloading the sdist
#                         (what `sources` prints, or benchmarks/gpu_check.sh's carried copy)
#   TIDE_GGML_CUDA_ARCH   CMAKE_CUDA_ARCHITECTURES for cuda (default: native, the visible GPUs')
#
# The build folder is <root>/<version>-<backend>-<hash>, the hash over the backend, the CMake
# flags, the recipe below, (GGML_NATIVE builds for the building CPU) the CPU's flags and, for
# cuda, the compiler and GPUs. A folder with a finished build is reused as is: the script then
# only prints it. Everything else (sdist, sources, object files, the Vulkan headers) stays in
# <root>/work and may be deleted.
#
# Needs: python with pip (unless TIDE_GGML_SOURCES is given), cmake >= 3.21, a C++17 compiler,
# ninja or make. For vulkan also glslc, SPIRV-Headers, the Vulkan loader and headers, and a
# Vulkan driver to run on (lavapipe from mesa-vulkan-drivers on a machine without a GPU). On
# Debian/Ubuntu as root the missing packages are installed. ggml-vulkan needs Vulkan headers
# newer than Debian 12's 1.3.239 (vk::LayerSettingEXT): when the system headers lack it, Debian
# 13's libvulkan-dev is downloaded (not installed) and only its headers are used. For cuda the
# CUDA toolkit (nvcc on PATH or in /usr/local/cuda), and for the native architecture cmake >=
# 3.24 or nvidia-smi. Flash-attention kernels are left out (GGML_CUDA_FA=OFF): tide's forward
# does not use them, and they are most of the CUDA build's time.
#
# Progress goes to stderr; stdout is only the folder.
set -euo pipefail

die() { echo "build_ggml.sh: $*" >&2; exit 1; }
log() { echo "build_ggml.sh: $*" >&2; }

BACKEND="${1:-}"
case "$BACKEND" in
    vulkan|cuda|cpu|sources) ;;
    -h|--help|"") sed -n '2,37p' "$0" | sed 's/^# \{0,1\}//' >&2; [ -n "$BACKEND" ] && exit 0; exit 2 ;;
    *) die "unknown backend '$BACKEND' (supported: vulkan, cuda, cpu; or sources)" ;;
esac

HERE="$(cd "$(dirname "$0")/.." && pwd)"
# The pin lives in one place: tide_local/ggml/_lib.py (GGML_VERSION_PIN = "llama-cpp-python==X").
PIN="$(sed -n 's/^GGML_VERSION_PIN = "\(llama-cpp-python==[^"]*\)"$/\1/p' "$HERE/tide_local/ggml/_lib.py")"
[ -n "$PIN" ] || die "cannot read GGML_VERSION_PIN from tide_local/ggml/_lib.py"
VERSION="${PIN#llama-cpp-python==}"

if [ -n "${TIDE_GGML_BUILD_ROOT:-}" ]; then
    ROOT="$TIDE_GGML_BUILD_ROOT"
elif [ -n "${TIDE_CACHE_DIR:-}" ]; then
    ROOT="$TIDE_CACHE_DIR/ggml"
else
    ROOT="${XDG_CACHE_HOME:-$HOME/.cache}/tide-local/ggml"
fi
WORK="$ROOT/work"

# ---------------------------------------------------------------- sources
# The sdist's vendor/llama.cpp/ggml, unpacked once into $WORK; GGML_SRC is the folder to build.
# It holds a .tide-pin file naming the pin, so that a copy of it can be checked elsewhere.
fetch_sources() {
    local src="$WORK/src-$VERSION"
    GGML_SRC="$src/vendor/llama.cpp/ggml"
    if [ ! -f "$src/.complete" ]; then
        log "downloading the $PIN sdist"
        mkdir -p "$WORK"
        rm -rf "$src" "$WORK/sdist"
        python -m pip download --no-binary :all: --no-deps -q "$PIN" -d "$WORK/sdist" >&2
        mkdir -p "$src"
        tar -xzf "$WORK/sdist"/llama_cpp_python-"$VERSION".tar.gz -C "$src" --strip-components=1 \
            "llama_cpp_python-$VERSION/vendor/llama.cpp/ggml"
        [ -f "$GGML_SRC/CMakeLists.txt" ] || die "no vendor/llama.cpp/ggml in the $PIN sdist"
        # The sdist leaves out ggml.pc.in, which a standalone ggml configure reads (for a
        # pkg-config file we do not use): an empty one will do.
        [ -e "$GGML_SRC/ggml.pc.in" ] || : > "$GGML_SRC/ggml.pc.in"
        rm -rf "$WORK/sdist"
        touch "$src/.complete"
    fi
    [ -f "$GGML_SRC/.tide-pin" ] || echo "$PIN" > "$GGML_SRC/.tide-pin"
}

given_sources() {
    GGML_SRC="$(cd "$TIDE_GGML_SOURCES" 2>/dev/null && pwd)" \
        || die "TIDE_GGML_SOURCES=$TIDE_GGML_SOURCES is not a folder"
    [ -f "$GGML_SRC/CMakeLists.txt" ] || die "TIDE_GGML_SOURCES=$GGML_SRC has no CMakeLists.txt (a ggml source folder?)"
    if [ -f "$GGML_SRC/.tide-pin" ] && [ "$(cat "$GGML_SRC/.tide-pin")" != "$PIN" ]; then
        die "TIDE_GGML_SOURCES=$GGML_SRC holds $(cat "$GGML_SRC/.tide-pin"), not $PIN"
    fi
}

if [ "$BACKEND" = sources ]; then
    fetch_sources
    echo "$GGML_SRC"
    exit 0
fi

# ---------------------------------------------------------------- recipe
# Bump when the recipe changes in a way the flags do not show.
RECIPE=1
# llama-cpp-python's own CPU build: ggml's defaults (GGML_NATIVE on when not cross-compiling,
# OpenMP, no BACKEND_DL) with llama.cpp's override (the llamafile sgemm on: it decides the CPU's
# f32/f16 matmul kernels, so the CPU engine's numbers), Release, shared libraries, $ORIGIN rpath.
CMAKE_FLAGS=(
    -DCMAKE_BUILD_TYPE=Release
    -DBUILD_SHARED_LIBS=ON
    -DGGML_NATIVE=ON
    -DGGML_OPENMP=ON
    -DGGML_BACKEND_DL=OFF
    -DGGML_CPU=ON
    -DGGML_LLAMAFILE=ON
    -DGGML_CCACHE=OFF
    -DGGML_BUILD_TESTS=OFF
    -DGGML_BUILD_EXAMPLES=OFF
)
KEY=()  # what else a build depends on, beyond the flags (hashed only where it applies)
LIBS=(libggml.so libggml-base.so libggml-cpu.so)

cmake_at_least() {  # cmake_at_least 3.24
    local have
    have="$(cmake --version 2>/dev/null | sed -n 's/^cmake version \([0-9.]*\).*/\1/p')"
    [ -n "$have" ] && [ "$(printf '%s\n%s\n' "$1" "$have" | sort -V | head -1)" = "$1" ]
}

# The CUDA compiler (exported as CUDACXX for CMake) and the architecture to build for.
cuda_setup() {
    local nvcc caps
    nvcc="$(command -v nvcc || true)"
    [ -n "$nvcc" ] || [ ! -x /usr/local/cuda/bin/nvcc ] || nvcc=/usr/local/cuda/bin/nvcc
    [ -n "$nvcc" ] \
        || die "no CUDA compiler: nvcc is neither on PATH nor in /usr/local/cuda/bin (install the CUDA toolkit)"
    export CUDACXX="$nvcc"
    CUDA_ARCH="${TIDE_GGML_CUDA_ARCH:-native}"
    caps="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null \
        | tr -d '.' | sort -u | paste -sd';' || true)"
    if [ "$CUDA_ARCH" = native ]; then
        [ -n "$caps" ] || die "no GPU visible to nvidia-smi, so there is no native architecture:" \
            "set TIDE_GGML_CUDA_ARCH (e.g. 90 for an H100)"
        # CMake resolves "native" itself from 3.24 on; older ones get the visible GPUs' list
        cmake_at_least 3.24 || CUDA_ARCH="$caps"
    fi
    KEY+=("nvcc=$("$nvcc" --version | tail -1)" "gpus=$caps")
}

case "$BACKEND" in
    vulkan) CMAKE_FLAGS+=(-DGGML_VULKAN=ON); LIBS+=(libggml-vulkan.so) ;;
    cuda)
        cuda_setup
        CMAKE_FLAGS+=(-DGGML_CUDA=ON -DGGML_CUDA_FA=OFF "-DCMAKE_CUDA_ARCHITECTURES=$CUDA_ARCH")
        LIBS+=(libggml-cuda.so)
        ;;
    cpu) ;;
esac

CPU_KEY=""
if [ -r /proc/cpuinfo ]; then
    CPU_KEY="$(grep -m1 '^flags' /proc/cpuinfo || true)"
fi
HASH="$(printf '%s\n' "recipe=$RECIPE" "backend=$BACKEND" "version=$VERSION" "${CMAKE_FLAGS[@]}" "cpu=$CPU_KEY" \
    "${KEY[@]}" | sha256sum | cut -c1-12)"

DEST="$ROOT/$VERSION-$BACKEND-$HASH"
LIBDIR="$DEST/lib"

finished() {
    [ -f "$DEST/.complete" ] || return 1
    local f
    for f in "${LIBS[@]}"; do [ -e "$LIBDIR/$f" ] || return 1; done
}

if finished; then
    log "reusing $DEST"
    echo "$LIBDIR"
    exit 0
fi

JOBS="${TIDE_GGML_JOBS:-$(nproc 2>/dev/null || echo 2)}"
mkdir -p "$WORK"
START=$(date +%s)

# ---------------------------------------------------------------- tools and packages
SUDO=""
if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo -n"; fi
can_apt() { [ -z "${TIDE_GGML_NO_APT:-}" ] && command -v apt-get >/dev/null 2>&1 && { [ "$(id -u)" = 0 ] || [ -n "$SUDO" ]; }; }

NEED=()
command -v cmake >/dev/null 2>&1 || NEED+=(cmake)
command -v c++ >/dev/null 2>&1 || NEED+=(g++)
command -v ninja >/dev/null 2>&1 || command -v make >/dev/null 2>&1 || NEED+=(ninja-build)
if [ "$BACKEND" = vulkan ]; then
    command -v glslc >/dev/null 2>&1 || NEED+=(glslc)
    # the loader (libvulkan.so for linking) and a driver to run on (lavapipe where there is no GPU)
    ls /usr/lib/*/libvulkan.so /usr/lib/libvulkan.so /usr/lib64/libvulkan.so >/dev/null 2>&1 || NEED+=(libvulkan-dev)
    ls /usr/share/vulkan/icd.d/*.json /etc/vulkan/icd.d/*.json >/dev/null 2>&1 || NEED+=(mesa-vulkan-drivers)
    # ggml-vulkan's CMake asks for SPIRV-Headers' CMake package
    ls /usr/share/cmake/SPIRV-Headers /usr/lib/*/cmake/SPIRV-Headers /usr/local/share/cmake/SPIRV-Headers \
        >/dev/null 2>&1 || [ -n "${VULKAN_SDK:-}" ] || NEED+=(spirv-headers)
fi
if [ "${#NEED[@]}" -gt 0 ]; then
    can_apt || die "missing ${NEED[*]} (Debian/Ubuntu package names); install them or run as root"
    log "installing ${NEED[*]}"
    $SUDO apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${NEED[@]}" >&2
fi

# Vulkan headers: the system's if they are new enough, else Debian 13's libvulkan-dev, unpacked.
VK_INCLUDE=""
if [ "$BACKEND" = vulkan ] && ! grep -qs VkLayerSettingEXT /usr/include/vulkan/vulkan_core.h; then
    HDR="$WORK/vulkan-headers"
    if ! grep -qs VkLayerSettingEXT "$HDR/usr/include/vulkan/vulkan_core.h"; then
        command -v apt-get >/dev/null 2>&1 && command -v dpkg >/dev/null 2>&1 \
            || die "the system's Vulkan headers are too old (no VkLayerSettingEXT) and apt-get/dpkg are missing to fetch newer ones; install Vulkan headers >= 1.3.261"
        log "system Vulkan headers are too old; fetching Debian 13's libvulkan-dev headers"
        APT="$WORK/apt-trixie"
        rm -rf "$APT" "$HDR"
        mkdir -p "$APT/lists/partial" "$APT/cache/archives/partial" "$APT/deb" "$HDR"
        echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie main" \
            > "$APT/sources.list"
        APT_OPTS=(-o "Dir::Etc::sourcelist=$APT/sources.list" -o "Dir::Etc::sourceparts=-"
                  -o "Dir::State::Lists=$APT/lists" -o "Dir::Cache=$APT/cache"
                  -o "Dir::Cache::pkgcache=" -o "Dir::Cache::srcpkgcache="
                  -o "APT::Get::List-Cleanup=0")
        apt-get "${APT_OPTS[@]}" update -qq >&2
        (cd "$APT/deb" && apt-get "${APT_OPTS[@]}" download libvulkan-dev >&2)
        dpkg -x "$APT/deb"/libvulkan-dev_*.deb "$HDR"
        grep -qs VkLayerSettingEXT "$HDR/usr/include/vulkan/vulkan_core.h" \
            || die "Debian 13's libvulkan-dev has no VkLayerSettingEXT either"
        rm -rf "$APT"
    fi
    VK_INCLUDE="$HDR/usr/include"
fi

# ---------------------------------------------------------------- build
if [ -n "${TIDE_GGML_SOURCES:-}" ]; then given_sources; else fetch_sources; fi
BUILD="$WORK/build-$VERSION-$BACKEND-$HASH"
GEN=()
command -v ninja >/dev/null 2>&1 && GEN=(-G Ninja)
EXTRA=()
[ -n "$VK_INCLUDE" ] && EXTRA+=("-DVulkan_INCLUDE_DIR=$VK_INCLUDE")
log "configuring $GGML_SRC in $BUILD"
cmake -S "$GGML_SRC" -B "$BUILD" "${GEN[@]}" "${CMAKE_FLAGS[@]}" "${EXTRA[@]}" \
    -DCMAKE_INSTALL_PREFIX="$DEST" -DCMAKE_INSTALL_LIBDIR=lib \
    -DCMAKE_INSTALL_RPATH='$ORIGIN' -DCMAKE_BUILD_WITH_INSTALL_RPATH=ON >&2
case "$BACKEND" in
    vulkan) log "building with $JOBS jobs (ggml-vulkan compiles a few hundred shaders: minutes)" ;;
    cuda) log "building with $JOBS jobs for CUDA architecture $CUDA_ARCH (a few minutes on 16 cores)" ;;
    *) log "building with $JOBS jobs" ;;
esac
cmake --build "$BUILD" -j "$JOBS" >&2
rm -rf "$DEST"
cmake --install "$BUILD" >&2
for f in "${LIBS[@]}"; do [ -e "$LIBDIR/$f" ] || die "the build has no $f in $LIBDIR"; done
{
    echo "pin=$PIN"
    echo "backend=$BACKEND"
    echo "sources=$GGML_SRC"
    echo "flags=${CMAKE_FLAGS[*]} ${EXTRA[*]}"
    echo "built=$(date -u +%Y-%m-%dT%H:%M:%SZ) in $(( $(date +%s) - START ))s"
} > "$DEST/build-info.txt"
touch "$DEST/.complete"
rm -rf "$BUILD"
log "done in $(( $(date +%s) - START ))s: $DEST"
echo "$LIBDIR"
