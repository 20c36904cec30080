# Sourced (`. scripts/nccl-path.sh`) before running a CUDA mmrec-train on a GPU machine:
# that binary links libnccl.so.2 (the `nccl` feature). When the system's loader does not
# know one, this adds the NCCL that PyTorch ships (the nvidia-nccl-cu13 wheel) to
# LD_LIBRARY_PATH. With neither, a CUDA mmrec-train does not start ("error while loading
# shared libraries: libnccl.so.2"); CPU builds need nothing.
if ! ldconfig -p 2>/dev/null | grep -q 'libnccl\.so\.2'; then
  __nccl_lib=$(python3 -c 'import os, nvidia.nccl as m; print(os.path.join(m.__path__[0], "lib"))' 2>/dev/null || true)
  if [[ -n "$__nccl_lib" && -e "$__nccl_lib/libnccl.so.2" ]]; then
    export LD_LIBRARY_PATH="$__nccl_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  fi
  unset __nccl_lib
fi
