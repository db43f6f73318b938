#!/usr/bin/env bash
# Fetch, on a machine that reaches a package index, the wheels a GPU node with PyTorch already installed still
# needs to run this project and launch/gpu-check.sh; carry DIR to the node; there:
#   bash launch/gpu-check.sh --wheels DIR        (installs them offline into the check's own folder)
# Usage:
#   bash launch/wheels.sh DIR                    # CUDA 12 and 13 builds of DALI (the node's torch picks one)
#   bash launch/wheels.sh DIR --cuda 12          # one CUDA major version: the one `python -c "import torch;
#                                                # print(torch.version.cuda)"` prints on the node
#   bash launch/wheels.sh DIR --python 3.12      # the node's Python (default: this machine's python3)
#   bash launch/wheels.sh DIR --arch aarch64     # Grace / ARM nodes (default x86_64)
#   bash launch/wheels.sh DIR --dry-run          # list what it would fetch, download nothing
# Layout: DIR/common (pure-Python and small compiled dependencies: webdataset, accelerate, einops, pytest, ...),
# DIR/cuda12 and DIR/cuda13 (DALI with its nvImageCodec, nvJPEG, nvJPEG2000, nvTIFF and nvCOMP wheels).
# Not fetched: torch and what torch itself requires (filelock, typing-extensions, fsspec, sympy, networkx,
# jinja2), and torchvision, whose build must match the node's torch exactly (take it from the same place as
# torch). Versions: the tested pins of launch/constraints.txt where it names the package, else the tested
# versions below; gpu-check installs only the wheels whose distribution the node lacks.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
die() { echo "wheels.sh: $*" >&2; exit 2; }
dir="" cudas="12 13" pyver="" arch="x86_64" dry=0
while [ $# -gt 0 ]; do
  case "$1" in
    --cuda) [ $# -ge 2 ] || die "--cuda needs 12 or 13"; cudas="$2"; shift 2 ;;
    --python) [ $# -ge 2 ] || die "--python needs a version such as 3.12"; pyver="$2"; shift 2 ;;
    --arch) [ $# -ge 2 ] || die "--arch needs x86_64 or aarch64"; arch="$2"; shift 2 ;;
    --dry-run) dry=1; shift ;;
    -h|--help) sed -n '2,21p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) die "unknown option $1" ;;
    *) [ -z "$dir" ] || die "one folder only ($dir, $1)"; dir="$1"; shift ;;
  esac
done
[ -n "$dir" ] || die "usage: bash launch/wheels.sh DIR [--cuda 12|13] [--python 3.12] [--arch x86_64|aarch64] [--dry-run]"
for c in $cudas; do [ "$c" = 12 ] || [ "$c" = 13 ] || die "--cuda $c: DALI is built for CUDA 12 or 13"; done
[ "$arch" = x86_64 ] || [ "$arch" = aarch64 ] || die "--arch $arch: x86_64 or aarch64"
if [ -z "$pyver" ]; then
  pyver="$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)" || die "no python3 here: pass --python"
fi
[[ "$pyver" =~ ^3\.(1[0-9])$ ]] || die "--python $pyver: expected 3.10 .. 3.13"
minor="${BASH_REMATCH[1]}"

# The tested pin of a package: launch/constraints.txt if it names it, else the given default.
pin() {
  local v
  v="$(grep -i -E "^$1==" "$root/launch/constraints.txt" 2>/dev/null | head -n1 | cut -d= -f3 || true)"
  echo "$1==${v:-$2}"
}
dali_version="$(pin nvidia-dali-cuda120 2.4.0 | cut -d= -f3)"
common=(
  # webdataset and the data side
  "$(pin webdataset 1.0.2)" braceexpand==0.1.7 pyyaml==6.0.4 numpy==2.4.6 pillow==13.0.0 tqdm==4.70.1
  # the digits shards: scikit-learn and its dependencies
  scikit-learn==1.9.1 scipy==1.17.1 joblib==1.6.0 threadpoolctl==3.8.0 narwhals==2.29.0 cloudpickle==3.1.3
  # training: accelerate and its dependencies, einops, safetensors
  "$(pin accelerate 1.15.0)" psutil==7.2.2 huggingface_hub==2.4.0 hf-xet==1.8.0 httpx2==2.17.0
  httpcore2==2.17.0 anyio==4.16.0 h11==0.16.0 idna==3.21 truststore==0.10.5 click==8.5.1
  "$(pin einops 0.8.2)" safetensors==0.8.0
  # DALI's pure-Python side (the same for both CUDA builds)
  astunparse==1.6.3 wheel==0.48.0 six==1.17.0 gast==0.7.0 optree==0.20.0 packaging==26.3 nvtx==0.2.17
  makefun==1.16.0 libcst==1.9.0
  # the GPU tests
  pytest==9.2.0 pytest-timeout==2.4.0 iniconfig==2.3.1 pluggy==1.7.0 pygments==2.21.0
)
if [ "$minor" -lt 11 ]; then  # Python 3.10: the last releases for it, and pytest's and anyio's backports
  common=("${common[@]/#numpy==*/numpy==2.2.6}")
  common=("${common[@]/#scipy==*/scipy==1.15.3}")
  common=("${common[@]/#scikit-learn==*/scikit-learn==1.7.2}")
  common=("${common[@]/#pillow==*/pillow==12.3.0}")
  common=("${common[@]/#httpx2==*/httpx2==2.14.0}")
  common=("${common[@]/#httpcore2==*/httpcore2==2.14.0}")
  common+=(exceptiongroup==1.3.0 tomli==2.2.1)
fi
cuda12=(nvidia-dali-cuda120=="$dali_version" nvidia-nvimgcodec-cu12==0.9.0.20 nvidia-nvjpeg-cu12==12.4.0.76
        nvidia-nvjpeg2k-cu12==0.11.0.51 nvidia-nvtiff-cu12==0.8.0.82 nvidia-libnvcomp-cu12==5.3.0.16)
cuda13=(nvidia-dali-cuda130=="$dali_version" nvidia-nvimgcodec-cu13==0.9.0.20 nvidia-nvjpeg==13.3.2.43
        nvidia-nvjpeg2k-cu13==0.11.0.51 nvidia-nvtiff-cu13==0.8.0.82 nvidia-libnvcomp-cu13==5.3.0.16)

groups=(common)
for c in $cudas; do groups+=("cuda$c"); done
if [ "$dry" = 1 ]; then
  echo "wheels.sh --dry-run: for CPython $pyver on manylinux $arch, into $dir (nothing is downloaded)"
  for g in "${groups[@]}"; do
    declare -n list="$g"
    echo "$dir/$g: ${#list[@]} wheels"
    printf '  %s\n' "${list[@]}"
  done
  exit 0
fi

plat=()
for p in manylinux_2_28 manylinux_2_27 manylinux_2_17 manylinux2014 manylinux_2_12 manylinux2010 manylinux_2_5 manylinux1; do
  plat+=(--platform "${p}_$arch")
done
mkdir -p "$dir"
for g in "${groups[@]}"; do
  declare -n list="$g"
  echo "[sskd] $g: ${#list[@]} wheels into $dir/$g" >&2
  mkdir -p "$dir/$g"
  printf '%s\n' "${list[@]}" > "$dir/$g/requirements.txt"
  python3 -m pip download --no-deps --only-binary=:all: --disable-pip-version-check -q \
    --python-version "$pyver" --implementation cp --abi "cp3$minor" --abi abi3 --abi none "${plat[@]}" \
    -d "$dir/$g" -r "$dir/$g/requirements.txt" || die "pip download failed for $dir/$g (is an index reachable?)"
done
total=0
for g in "${groups[@]}"; do
  bytes="$(find "$dir/$g" -name '*.whl' -printf '%s\n' | awk '{s += $1} END {print s + 0}')"
  total=$((total + bytes))
  printf '%-8s %4d wheels %8.1f MB\n' "$g" "$(find "$dir/$g" -name '*.whl' | wc -l)" "$(awk "BEGIN {print $bytes / 1e6}")"
done
printf 'total %18.1f MB in %s (CPython %s, %s); on the node: bash launch/gpu-check.sh --wheels %s\n' \
  "$(awk "BEGIN {print $total / 1e6}")" "$dir" "$pyver" "$arch" "$dir"
