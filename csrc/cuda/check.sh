#!/usr/bin/env bash
# Compile-check the CUDA sources of csrc/cuda/ for GPU readiness (no GPU needed, nothing is run).
#
# Usage: check.sh [file.cu ...]   (default: every *.cu next to this script)
# For every source and every target architecture (default: sm_80 sm_90; override with
# CUDA_ARCHS="sm_80 sm_90a ..."; extra nvcc flags in NVCC_FLAGS, e.g. "-maxrregcount=16"):
#   * `nvcc -cubin -arch=<arch> -Xptxas -v` and one line per kernel:
#       RESOURCE arch=<arch> file=<file> kernel=<name> registers=<n> spill_stores=<bytes>
#                spill_loads=<bytes> stack=<bytes> static_smem=<bytes>
#     (static_smem excludes dynamic shared memory, which the launcher sizes per call);
#   * `nvcc -c` of the whole file, so the extern "C" host launcher compiles too, and one line
#       EXPORTS file=<file> symbols=<name>,<name>   (its unmangled global functions, via nm).
# Exit status: 0 when everything compiled and no kernel spills, 1 on spills, 2 on a compile
# error or a missing nvcc. tests/test_cuda_compile.py runs this script and parses its output.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
archs="${CUDA_ARCHS:-sm_80 sm_90}"
nvcc_bin="${NVCC:-nvcc}"
read -r -a extra_flags <<<"${NVCC_FLAGS:-}"

if ! command -v "$nvcc_bin" >/dev/null 2>&1; then
  echo "check.sh: nvcc not found on PATH (set NVCC=/path/to/nvcc)" >&2
  exit 2
fi
demangle() { if command -v c++filt >/dev/null 2>&1; then c++filt; else cat; fi; }

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
status=0
shopt -s nullglob
if [ $# -gt 0 ]; then sources=("$@"); else sources=("$here"/*.cu); fi
if [ ${#sources[@]} -eq 0 ]; then
  echo "check.sh: no .cu files given or in $here" >&2
  exit 2
fi

for src in "${sources[@]}"; do
  name="$(basename "$src" .cu)"
  for arch in $archs; do
    log="$tmp/$name.$arch.log"
    if ! "$nvcc_bin" -cubin -arch="$arch" -Xptxas -v ${extra_flags[@]+"${extra_flags[@]}"} -o "$tmp/$name.$arch.cubin" "$src" >"$log" 2>&1; then
      echo "COMPILE_ERROR arch=$arch file=$name.cu (cubin)"
      cat "$log"
      status=2
      continue
    fi
    # ptxas -v prints, per kernel: "Compiling entry function '<mangled>' for '<arch>'", then
    # "N bytes stack frame, N bytes spill stores, N bytes spill loads", then
    # "Used N registers, ... [N bytes smem, ...]". Host-side helpers have no entry line.
    awk -v arch="$arch" -v file="$name.cu" '
      /Compiling entry function/ {
        match($0, /entry function '\''[^'\'']+'\''/)
        kernel = substr($0, RSTART + 16, RLENGTH - 17); stack = ""; next
      }
      kernel != "" && /bytes stack frame/ {
        for (i = 1; i <= NF; i++) {
          if ($(i+1) == "bytes" && $(i+2) == "stack") stack = $i
          if ($(i+1) == "bytes" && $(i+2) == "spill" && $(i+3) == "stores,") stores = $i
          if ($(i+1) == "bytes" && $(i+2) == "spill" && $(i+3) == "loads") loads = $i
        }
        next
      }
      kernel != "" && stack != "" && /Used [0-9]+ registers/ {
        regs = 0; smem = 0
        for (i = 1; i <= NF; i++) {
          if ($i == "Used") regs = $(i+1)
          if ($(i+1) == "bytes" && $(i+2) ~ /^smem/) smem = $i
        }
        printf "RESOURCE arch=%s file=%s registers=%s spill_stores=%s spill_loads=%s stack=%s static_smem=%s kernel=%s\n", \
               arch, file, regs, stores, loads, stack, smem, kernel
        kernel = ""; stack = ""
      }' "$log" >"$tmp/$name.$arch.res"
    if [ ! -s "$tmp/$name.$arch.res" ]; then
      echo "COMPILE_ERROR arch=$arch file=$name.cu (no kernel found in the ptxas report)"
      cat "$log"
      status=2
      continue
    fi
    # Demangle the kernel name (last field) for humans; the numbers stay machine-readable.
    while IFS= read -r line; do
      mangled="${line##*kernel=}"
      echo "${line%kernel=*}kernel=$(printf '%s\n' "$mangled" | demangle | sed -E 's/\([^()]*\)$//; s/.*:://')"
    done <"$tmp/$name.$arch.res"
    if awk '{ for (i = 1; i <= NF; i++) if ($i ~ /^spill_(stores|loads)=/) { split($i, kv, "="); if (kv[2] + 0 > 0) bad = 1 } }
            END { exit bad ? 0 : 1 }' "$tmp/$name.$arch.res"; then
      echo "SPILLS arch=$arch file=$name.cu"
      [ "$status" -eq 0 ] && status=1
    fi
  done
  # Host side: the extern "C" launcher and the kernel launch must compile as well.
  first_arch="${archs%% *}"
  if "$nvcc_bin" -c -arch="$first_arch" ${extra_flags[@]+"${extra_flags[@]}"} -o "$tmp/$name.o" "$src" >"$tmp/$name.host.log" 2>&1; then
    echo "HOST_OK arch=$first_arch file=$name.cu"
    # The unmangled (extern "C") entry points a binding or ctypes would look up.
    if command -v nm >/dev/null 2>&1; then
      echo "EXPORTS file=$name.cu symbols=$(nm -g --defined-only "$tmp/$name.o" | awk '$2 == "T" && $3 !~ /^_Z/ { printf "%s%s", sep, $3; sep = "," }')"
    fi
  else
    echo "COMPILE_ERROR arch=$first_arch file=$name.cu (host object)"
    cat "$tmp/$name.host.log"
    status=2
  fi
done
exit "$status"
