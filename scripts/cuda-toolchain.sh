#!/usr/bin/env bash
# Installs a CUDA 13.0 toolchain that can *build* (not run) the CUDA binaries on a machine
# with no GPU and no system CUDA: NVIDIA's PyPI wheels for nvcc and the libraries, plus a
# link-time stub of the driver library (libcuda belongs to the driver, which the wheels do
# not ship; the real one is loaded at run time on the GPU machine).
#
# Usage: scripts/cuda-toolchain.sh [PREFIX]        (default /opt/cu13pip)
# Prints the environment to `eval`: CUDA_ROOT, PATH, LIBRARY_PATH, CUDA_COMPUTE_CAP.
# Idempotent: a second run only prints the environment.
set -euo pipefail

prefix="${1:-/opt/cu13pip}"
root="$prefix/nvidia/cu13"
# 13.0 to match the GPU machines' driver (580, CUDA 13.0): cudarc refuses a newer toolkit
# version than the driver at run time.
wheels=(nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88
  nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-cuda-nvrtc==13.0.88
  nvidia-curand==10.4.0.35 nvidia-cublas==13.1.0.3)

if [[ ! -x "$root/bin/nvcc" ]]; then
  echo "installing CUDA 13.0 wheels into $prefix (about 1.2 GB)" >&2
  python3 -m pip install -q --no-deps --target "$prefix" "${wheels[@]}" >&2
fi

# The wheels ship versioned sonames only; the linker looks for the plain names.
(cd "$root/lib" && for l in cudart cublas cublasLt nvrtc; do ln -sf "lib$l.so.13" "lib$l.so"; done \
  && ln -sf libcurand.so.10 libcurand.so)
(cd "$root" && ln -sfn lib lib64)

# A link-time stub of a library that belongs to the GPU machine, not to the wheels: every
# entry point cudarc declares for it (in cudarc's MODULE/sys/mod.rs, names starting with
# PREFIX), as a function returning an error. Enough to link; never loaded at run time (the
# real one is).
link_stub() { # NAME SONAME MODULE PREFIX
  local stub="$root/lib/stubs/lib$1.so" sys
  [[ -f "$stub" ]] && return
  sys=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.*/src/"$3"/sys/mod.rs 2>/dev/null | tail -n1)
  if [[ -z "$sys" ]]; then
    echo "cudarc 0.19 sources not found: run 'cargo fetch' in the workspace first" >&2
    exit 1
  fi
  mkdir -p "$root/lib/stubs"
  grep -oE "pub unsafe fn $4[A-Za-z0-9_]+" "$sys" | awk '{print $4}' | sort -u \
    | sed 's/.*/int &(void){return 999;}/' >"$root/lib/stubs/lib$1_stub.c"
  gcc -shared -fPIC -Wl,-soname,"$2" -o "$stub" "$root/lib/stubs/lib$1_stub.c"
}
# libcuda belongs to the driver.
link_stub cuda libcuda.so.1 driver cu
# The `nccl` feature links libnccl.so.2; the GPU machine's comes with its PyTorch
# (nvidia-nccl-cu13): a stub instead of a 250 MB wheel.
link_stub nccl libnccl.so.2 nccl nccl

cat <<EOF
export CUDA_ROOT=$root CUDA_HOME=$root
export PATH=$root/bin:\$PATH
export LIBRARY_PATH=$root/lib:$root/lib/stubs\${LIBRARY_PATH:+:\$LIBRARY_PATH}
export CUDA_COMPUTE_CAP=\${CUDA_COMPUTE_CAP:-90}
EOF
