#!/usr/bin/env bash
# Build the pinned ggml (the llama.cpp sources vendored in the llama-cpp-python sdist that
# tide-local declares its ctypes layer against) with an accelerator backend, into a cache
# folder outside the checkout, and print the folder to use as TIDE_GGML_LIB_DIR.
#
#   scripts/build_ggml.sh vulkan            # build (or reuse) and print the lib folder
#   export TIDE_GGML_LIB_DIR="$(scripts/build_ggml.sh vulkan)"
#   GGML_VK_VISIBLE_DEVICES=0 python -m pytest tests/test_device_backend.py   # lavapipe
#
# Options (environment):
#   TIDE_GGML_BUILD_ROOT  where builds live (default: ${TIDE_CACHE_DIR:-${XDG_CACHE_HOME:-~/.cache}/tide-local}/ggml)
#   TIDE_GGML_JOBS        parallel build jobs (default: the cores this process may use)
#   TIDE_GGML_NO_APT=1    never apt-get: fail with the missing packages' names instead
#
# The build folder is <root>/<version>-<hash>, the hash over the backend, the CMake flags,
# the recipe below and (GGML_NATIVE builds for the building CPU) the CPU's flags. A folder
# with a finished build is reused as is: the script then only prints it. Everything else
# (sdist, sources, object files, the Vulkan headers) stays in <root>/work and may be deleted.
#
# Needs: python with pip, cmake >= 3.21, a C++17 compiler, ninja or make. For vulkan also
# glslc, SPIRV-Headers, the Vulkan loader and headers, and a Vulkan driver to run on (lavapipe from
# mesa-vulkan-drivers on a machine without a GPU). On Debian/Ubuntu as root the missing
# packages are installed. ggml-vulkan needs Vulkan headers newer than Debian 12's 1.3.239
# (vk::LayerSettingEXT): when the system headers lack it, Debian 13's libvulkan-dev is
# downloaded (not installed) and only its headers are used.
#
# Progress goes to stderr; stdout is only the folder.
set -euo pipefail

die() { echo "build_ggml.sh: $*" >&2; exit 1; }
log() { echo "build_ggml.sh: $*" >&2; }

BACKEND="${1:-}"
case "$BACKEND" in
    vulkan) ;;
    -h|--help|"") sed -n '2,27p' "$0" | sed 's/^# \{0,1\}//' >&2; [ -n "$BACKEND" ] && exit 0; exit 2 ;;
    *) die "unknown backend '$BACKEND' (supported: vulkan)" ;;
esac

HERE="$(cd "$(dirname "$0")/.." && pwd)"
# The pin lives in one place: tide_local/ggml/_lib.py (GGML_VERSION_PIN = "llama-cpp-python==X").
PIN="$(sed -n 's/^GGML_VERSION_PIN = "\(llama-cpp-python==[^"]*\)"$/\1/p' "$HERE/tide_local/ggml/_lib.py")"
[ -n "$PIN" ] || die "cannot read GGML_VERSION_PIN from tide_local/ggml/_lib.py"
VERSION="${PIN#llama-cpp-python==}"

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
    -DGGML_VULKAN=ON
)
CPU_KEY=""
if [ -r /proc/cpuinfo ]; then
    CPU_KEY="$(grep -m1 '^flags' /proc/cpuinfo || true)"
fi
HASH="$(printf '%s\n' "recipe=$RECIPE" "backend=$BACKEND" "version=$VERSION" "${CMAKE_FLAGS[@]}" "cpu=$CPU_KEY" \
    | sha256sum | cut -c1-12)"

if [ -n "${TIDE_GGML_BUILD_ROOT:-}" ]; then
    ROOT="$TIDE_GGML_BUILD_ROOT"
elif [ -n "${TIDE_CACHE_DIR:-}" ]; then
    ROOT="$TIDE_CACHE_DIR/ggml"
else
    ROOT="${XDG_CACHE_HOME:-$HOME/.cache}/tide-local/ggml"
fi
DEST="$ROOT/$VERSION-$BACKEND-$HASH"
LIBDIR="$DEST/lib"
LIBS=(libggml.so libggml-base.so libggml-cpu.so "libggml-$BACKEND.so")

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
WORK="$ROOT/work"
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
command -v glslc >/dev/null 2>&1 || NEED+=(glslc)
# the loader (libvulkan.so for linking) and a driver to run on (lavapipe where there is no GPU)
ls /usr/lib/*/libvulkan.so /usr/lib/libvulkan.so /usr/lib64/libvulkan.so >/dev/null 2>&1 || NEED+=(libvulkan-dev)
ls /usr/share/vulkan/icd.d/*.json /etc/vulkan/icd.d/*.json >/dev/null 2>&1 || NEED+=(mesa-vulkan-drivers)
# ggml-vulkan's CMake asks for SPIRV-Headers' CMake package
ls /usr/share/cmake/SPIRV-Headers /usr/lib/*/cmake/SPIRV-Headers /usr/local/share/cmake/SPIRV-Headers \
    >/dev/null 2>&1 || [ -n "${VULKAN_SDK:-}" ] || NEED+=(spirv-headers)
if [ "${#NEED[@]}" -gt 0 ]; then
    can_apt || die "missing ${NEED[*]} (Debian/Ubuntu package names); install them or run as root"
    log "installing ${NEED[*]}"
    $SUDO apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${NEED[@]}" >&2
fi

# Vulkan headers: the system's if they are new enough, else Debian 13's libvulkan-dev, unpacked.
VK_INCLUDE=""
if ! grep -qs VkLayerSettingEXT /usr/include/vulkan/vulkan_core.h; then
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

# ---------------------------------------------------------------- sources
SRC="$WORK/src-$VERSION"
if [ ! -f "$SRC/.complete" ]; then
    log "downloading the $PIN sdist"
    rm -rf "$SRC" "$WORK/sdist"
    python -m pip download --no-binary :all: --no-deps -q "$PIN" -d "$WORK/sdist" >&2
    mkdir -p "$SRC"
    tar -xzf "$WORK/sdist"/llama_cpp_python-"$VERSION".tar.gz -C "$SRC" --strip-components=1 \
        "llama_cpp_python-$VERSION/vendor/llama.cpp/ggml"
    [ -f "$SRC/vendor/llama.cpp/ggml/CMakeLists.txt" ] || die "no vendor/llama.cpp/ggml in the $PIN sdist"
    # The sdist leaves out ggml.pc.in, which a standalone ggml configure reads (for a
    # pkg-config file we do not use): an empty one will do.
    [ -e "$SRC/vendor/llama.cpp/ggml/ggml.pc.in" ] || : > "$SRC/vendor/llama.cpp/ggml/ggml.pc.in"
    rm -rf "$WORK/sdist"
    touch "$SRC/.complete"
fi

# ---------------------------------------------------------------- build
BUILD="$WORK/build-$VERSION-$BACKEND-$HASH"
GEN=()
command -v ninja >/dev/null 2>&1 && GEN=(-G Ninja)
EXTRA=()
[ -n "$VK_INCLUDE" ] && EXTRA+=("-DVulkan_INCLUDE_DIR=$VK_INCLUDE")
log "configuring in $BUILD"
cmake -S "$SRC/vendor/llama.cpp/ggml" -B "$BUILD" "${GEN[@]}" "${CMAKE_FLAGS[@]}" "${EXTRA[@]}" \
    -DCMAKE_INSTALL_PREFIX="$DEST" -DCMAKE_INSTALL_LIBDIR=lib \
    -DCMAKE_INSTALL_RPATH='$ORIGIN' -DCMAKE_BUILD_WITH_INSTALL_RPATH=ON >&2
log "building with $JOBS jobs (ggml-vulkan compiles a few hundred shaders: minutes)"
cmake --build "$BUILD" -j "$JOBS" >&2
rm -rf "$DEST"
cmake --install "$BUILD" >&2
for f in "${LIBS[@]}"; do [ -e "$LIBDIR/$f" ] || die "the build has no $f in $LIBDIR"; done
{
    echo "pin=$PIN"
    echo "backend=$BACKEND"
    echo "flags=${CMAKE_FLAGS[*]} ${EXTRA[*]}"
    echo "built=$(date -u +%Y-%m-%dT%H:%M:%SZ) in $(( $(date +%s) - START ))s"
} > "$DEST/build-info.txt"
touch "$DEST/.complete"
rm -rf "$BUILD"
log "done in $(( $(date +%s) - START ))s: $DEST"
echo "$LIBDIR"
