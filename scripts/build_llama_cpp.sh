#!/usr/bin/env bash
# Build the llama.cpp that the llama-cpp-python sdist pins (CPU only, Release, only the binaries
# unmask's cross-implementation tests and speed script run) into a cache the tests find.
#
#   scripts/build_llama_cpp.sh            # -> $UNMASK_LLAMA_CPP (default <repo>/.cache/llama.cpp)
#
# The binaries land in $UNMASK_LLAMA_CPP/bin; $UNMASK_LLAMA_CPP/VERSION names the sdist they came
# from. A second run with the same version and all binaries present does nothing.
set -euo pipefail
VERSION="0.3.36"
TARGETS=(llama-diffusion-cli llama-completion llama-simple llama-bench llama-tokenize llama-quantize)
# Native (-march=native: the peer at its best on the machine it is measured on) but without AMX:
# on a CPU that reports AMX (Sapphire Rapids and later) ggml's AMX matrix path crashed with SIGSEGV
# in ggml_backend_amx_mul_mat inside this project's VMs. GCC's explicit -mno-amx-* win over what
# -march=native implies, so the AMX code is not compiled; AVX-512 stays where the CPU has it.
# FLAGS is recorded beside VERSION, so a build made with other flags is redone.
NO_AMX="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
case "$(uname -m)" in x86_64|amd64) ;; *) NO_AMX="" ;; esac
FLAGS=(-DGGML_NATIVE=ON "-DCMAKE_C_FLAGS=$NO_AMX" "-DCMAKE_CXX_FLAGS=$NO_AMX")
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DEST="${UNMASK_LLAMA_CPP:-$ROOT/.cache/llama.cpp}"
JOBS="${JOBS:-2}"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"

have_all() {
    [ "$(cat "$DEST/VERSION" 2>/dev/null)" = "llama-cpp-python==$VERSION" ] || return 1
    [ "$(cat "$DEST/FLAGS" 2>/dev/null)" = "${FLAGS[*]}" ] || return 1
    for t in "${TARGETS[@]}"; do [ -x "$DEST/bin/$t" ] || return 1; done
}
if have_all; then
    echo "llama.cpp from llama-cpp-python==$VERSION already built in $DEST/bin"
    exit 0
fi

SRC="$DEST/src"
mkdir -p "$SRC"
SDIST="$SRC/llama_cpp_python-$VERSION.tar.gz"
if [ ! -f "$SDIST" ]; then
    "$PYTHON" -m pip download --quiet --no-deps --no-binary :all: --dest "$SRC" "llama-cpp-python==$VERSION"
fi
if [ ! -d "$SRC/llama_cpp_python-$VERSION/vendor/llama.cpp" ]; then
    tar -xzf "$SDIST" -C "$SRC"
fi
LLAMA="$SRC/llama_cpp_python-$VERSION/vendor/llama.cpp"

cmake -S "$LLAMA" -B "$DEST/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_APP=OFF -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF "${FLAGS[@]}" >/dev/null
cmake --build "$DEST/build" --config Release -j "$JOBS" --target "${TARGETS[@]}"
mkdir -p "$DEST/bin"
for t in "${TARGETS[@]}"; do cp "$DEST/build/bin/$t" "$DEST/bin/$t"; done
echo "llama-cpp-python==$VERSION" > "$DEST/VERSION"
echo "${FLAGS[*]}" > "$DEST/FLAGS"
echo "llama.cpp from llama-cpp-python==$VERSION built in $DEST/bin: ${TARGETS[*]}"
