#!/usr/bin/env bash
# Build llama.cpp's `llama-server` from the llama-cpp-python sdist on PyPI (it vendors
# llama.cpp under vendor/llama.cpp; PyPI is the only network source our build hosts have).
# Result: build/llama-server/bin/llama-server. Does nothing if that binary already exists.
#
# Why these flags:
# - GGML_NATIVE=OFF: a -march=native build crashed on one host. Instead we list the ISA that
#   both target hosts (Intel with AMX, AMD Zen 5) have: SSE4.2/AVX/AVX2/FMA/F16C/BMI2 and
#   AVX-512 F/CD/VL/DQ/BW + VNNI + BF16. No AMX: Zen 5 lacks it.
# - BUILD_SHARED_LIBS=OFF: libllama/libggml are linked in statically, no .so to ship.
# - No network at build or run time: LLAMA_OPENSSL=OFF (this llama.cpp dropped libcurl for
#   cpp-httplib; LLAMA_CURL is now an ignored, deprecated option) and LLAMA_USE_PREBUILT_UI=OFF
#   (otherwise the build downloads the web UI from Hugging Face; the server API is unaffected).
set -euo pipefail

VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$ROOT/build/llama-server"
BIN="$OUT/bin/llama-server"
SDIST="$OUT/llama_cpp_python-$VERSION.tar.gz"
SRC="$OUT/llama_cpp_python-$VERSION"
PIP=("$ROOT/.venv/bin/pip")
[[ -x "${PIP[0]}" ]] || PIP=(python3 -m pip)

if [[ -x "$BIN" ]]; then echo "$BIN"; exit 0; fi
mkdir -p "$OUT"

[[ -f "$SDIST" ]] || "${PIP[@]}" download --no-deps --no-binary :all: -d "$OUT" "llama-cpp-python==$VERSION"
if [[ ! -f "$SRC/.unpacked" ]]; then
    rm -rf "$SRC" && tar -xzf "$SDIST" -C "$OUT" && touch "$SRC/.unpacked"
fi

cmake -S "$SRC/vendor/llama.cpp" -B "$OUT/cmake-build" \
    -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=OFF \
    -DGGML_SSE42=ON -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
    -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON \
    -DLLAMA_OPENSSL=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_UI=OFF
cmake --build "$OUT/cmake-build" --target llama-server -j 2

install -D -m 755 "$OUT/cmake-build/bin/llama-server" "$BIN"
echo "$BIN"
