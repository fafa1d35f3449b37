#!/usr/bin/env bash
# Build llama.cpp's `llama-server` and `llama-bench` from the llama-cpp-python sdist on PyPI
# (it vendors llama.cpp under vendor/llama.cpp; PyPI is the only network source our build
# hosts have), for the instruction set of the host this runs on.
# Result: build/llama-server/bin/llama-server and build/llama-server/bin/llama-bench, and
# build/llama-server/host-isa (the GGML_* ISA flags they were built with). Does nothing if
# both binaries exist and host-isa matches this host; rebuilds both otherwise (a binary built
# for another host dies with SIGILL, or leaves this host's wider vectors unused).
#
# Why these flags:
# - GGML_NATIVE=OFF: a -march=native build crashed on one host. Instead the GGML_* ISA
#   options are read off /proc/cpuinfo's flags (SSE4.2/AVX/AVX2/FMA/F16C/BMI2, AVX-VNNI,
#   AVX-512 F+CD+VL+DQ+BW, VBMI, VNNI, BF16, AMX tile/int8/bf16), so an AVX2-only Zen 3 gets
#   an AVX2 build, Zen 5 its AVX-512 one and an Intel host with AMX its AMX kernels.
#   llama.cpp's runtime dispatch (GGML_CPU_ALL_VARIANTS) needs GGML_BACKEND_DL, which needs
#   shared libraries: not an option with the static build below.
# - BUILD_SHARED_LIBS=OFF: libllama/libggml are linked in statically, no .so to ship.
# - No network at build or run time: LLAMA_OPENSSL=OFF (this llama.cpp dropped libcurl for
#   cpp-httplib; LLAMA_CURL is now an ignored, deprecated option) and LLAMA_USE_PREBUILT_UI=OFF
#   (otherwise the build downloads the web UI from Hugging Face; the server API is unaffected).
set -euo pipefail

VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$ROOT/build/llama-server"
BIN="$OUT/bin/llama-server"
BENCH="$OUT/bin/llama-bench"
ISA_FILE="$OUT/host-isa"
SDIST="$OUT/llama_cpp_python-$VERSION.tar.gz"
SRC="$OUT/llama_cpp_python-$VERSION"
PIP=("$ROOT/.venv/bin/pip")
[[ -x "${PIP[0]}" ]] || PIP=(python3 -m pip)

# The GGML_* options for this CPU: ON for each ISA extension /proc/cpuinfo lists.
host_isa_flags() {
    local cpu_flags
    cpu_flags=" $(grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2) "
    has() { local f; for f in "$@"; do [[ "$cpu_flags" == *" $f "* ]] || return 1; done; }
    onoff() { if has "$@"; then echo ON; else echo OFF; fi; }
    local avx512 amx
    avx512=$(onoff avx512f avx512cd avx512vl avx512dq avx512bw)
    echo "-DGGML_SSE42=$(onoff sse4_2) -DGGML_AVX=$(onoff avx) -DGGML_AVX2=$(onoff avx2)" \
        "-DGGML_FMA=$(onoff fma) -DGGML_F16C=$(onoff f16c) -DGGML_BMI2=$(onoff bmi2)" \
        "-DGGML_AVX_VNNI=$(onoff avx_vnni) -DGGML_AVX512=$avx512"
    # The AVX-512 extensions are only used on top of GGML_AVX512.
    if [[ $avx512 == ON ]]; then
        echo "-DGGML_AVX512_VBMI=$(onoff avx512_vbmi) -DGGML_AVX512_VNNI=$(onoff avx512_vnni)" \
            "-DGGML_AVX512_BF16=$(onoff avx512_bf16)"
        amx=$(onoff amx_tile)
        echo "-DGGML_AMX_TILE=$amx -DGGML_AMX_INT8=$(onoff amx_tile amx_int8) -DGGML_AMX_BF16=$(onoff amx_tile amx_bf16)"
    else
        echo "-DGGML_AVX512_VBMI=OFF -DGGML_AVX512_VNNI=OFF -DGGML_AVX512_BF16=OFF"
        echo "-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
    fi
}

ISA="$(host_isa_flags | tr '\n' ' ' | tr -s ' ' | sed 's/ $//')"
if [[ -x "$BIN" && -x "$BENCH" && -f "$ISA_FILE" && "$(cat "$ISA_FILE")" == "$ISA" ]]; then
    echo "$BIN"; exit 0
fi
mkdir -p "$OUT"
rm -f "$ISA_FILE"  # written again only once both binaries for this host are installed

[[ -f "$SDIST" ]] || "${PIP[@]}" download --no-deps --no-binary :all: -d "$OUT" "llama-cpp-python==$VERSION"
if [[ ! -f "$SRC/.unpacked" ]]; then
    rm -rf "$SRC" && tar -xzf "$SDIST" -C "$OUT" && touch "$SRC/.unpacked"
fi

echo "building llama.cpp with: $ISA" >&2
# shellcheck disable=SC2086  # $ISA is a list of -D options
cmake -S "$SRC/vendor/llama.cpp" -B "$OUT/cmake-build" \
    -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=OFF $ISA \
    -DLLAMA_OPENSSL=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_UI=OFF
cmake --build "$OUT/cmake-build" --target llama-server llama-bench -j 2

install -D -m 755 "$OUT/cmake-build/bin/llama-server" "$BIN"
install -D -m 755 "$OUT/cmake-build/bin/llama-bench" "$BENCH"
echo "$ISA" > "$ISA_FILE"
echo "$BIN"
