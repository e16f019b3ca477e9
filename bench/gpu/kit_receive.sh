#!/usr/bin/env bash
# Receive the vLLM 0.26.0 wheel kit in pieces and install it into /tmp/site (device has no network).
#
# The kit is ONE uncompressed tar (folder wheels/: vllm 0.26.0 without _vllm_fa2_C.abi3.so, plus the
# packages the device image lacks), split with `split -b 58M` into part01..partNN. Here each part
# lies in its own ignored folder .kit/pN/partNN, so one device call carries one: carry [".kit/p1"].
#
# Run at the start of every device call:   bash bench/gpu/kit_receive.sh
# It moves any .kit/p*/part* in the working tree into /tmp/kit (kept while the machine stays warm),
# checks each part's sha256, prints which parts it has, and once all are there joins them, checks the
# tar's sha256, untars into /tmp/kit and pip-installs the wheels into /tmp/site, then prints KIT READY.
# Then:  source bench/gpu/env.sh   (puts /tmp/site on PYTHONPATH).
# /tmp/kit/.installed makes later runs instant.
# Exit status: 0 kit installed; 3 parts still missing (normal while they arrive); 1 error.
set -u

KIT_PARTS=4
KIT_SHA256=01a777aec83a962dfad5800a9a488bda7f32ea921c90160810ebf9d775352260
KIT_PART_SHA256=(
  8f0aff155cdb5e34cde3351009d71fa7c9f7a1e9c9747ccd3a5fe93b019ccef4  # part01
  f1871279ab4aabb53fb7842a649f925a6631ec869f79dccabb5ebf6ed15e879b  # part02
  fe859b49c05fb0a5d91278d58790b7e3e6f11a0f7f1d1d3c99f8f345e0535c6e  # part03
  c651e81b541479bdbeefafa31a5ada8e4726ede4ed8af1e35f6e3e0c4ff94dc6  # part04
)
KIT_DIR=/tmp/kit
SITE=/tmp/site
PY=${PYTHON:-python3}

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
mkdir -p "$KIT_DIR" || exit 1

if [ -f "$KIT_DIR/.installed" ] && [ "$(cat "$KIT_DIR/.installed")" = "$KIT_SHA256" ] && [ -d "$SITE/vllm" ]; then
  # Parts carried again after install are just dropped.
  rm -rf "$ROOT"/.kit/p*/part* 2>/dev/null
  echo "KIT READY (already installed in $SITE)"
  exit 0
fi

shopt -s nullglob
for f in "$ROOT"/.kit/p*/part*; do
  n=$(basename "$f")
  mv -f "$f" "$KIT_DIR/$n" || { echo "kit: cannot move $f to $KIT_DIR" >&2; exit 1; }
  echo "kit: received $n"
done

have=(); missing=()
for i in $(seq 1 "$KIT_PARTS"); do
  n=$(printf 'part%02d' "$i")
  p="$KIT_DIR/$n"
  if [ -f "$p" ]; then
    if [ ! -f "$p.ok" ]; then
      s=$(sha256sum "$p" | cut -d' ' -f1)
      if [ "$s" != "${KIT_PART_SHA256[$((i-1))]}" ]; then
        echo "kit: $n has the wrong sha256 ($s), dropped it: carry it again" >&2
        rm -f "$p"; missing+=("$n"); continue
      fi
      touch "$p.ok"
    fi
    have+=("$n")
  else
    missing+=("$n")
  fi
done
echo "kit: parts present ${#have[@]}/$KIT_PARTS: ${have[*]:-none}"
if [ "${#missing[@]}" -gt 0 ]; then
  echo "kit: still missing: ${missing[*]} (carry .kit/pN one per call)"
  exit 3
fi

echo "kit: all parts here; joining and checking"
tarf="$KIT_DIR/kit.tar"
for i in $(seq 1 "$KIT_PARTS"); do cat "$KIT_DIR/$(printf 'part%02d' "$i")"; done > "$tarf" || exit 1
s=$(sha256sum "$tarf" | cut -d' ' -f1)
if [ "$s" != "$KIT_SHA256" ]; then
  echo "kit: joined tar has sha256 $s, expected $KIT_SHA256" >&2
  rm -f "$tarf"; exit 1
fi
rm -rf "$KIT_DIR/wheels"
tar -xf "$tarf" -C "$KIT_DIR" || { echo "kit: untar failed" >&2; exit 1; }
rm -f "$tarf"
echo "kit: $(ls "$KIT_DIR"/wheels/*.whl | wc -l) wheels; installing into $SITE"
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target "$SITE" "$KIT_DIR"/wheels/*.whl || { echo "kit: pip install failed" >&2; exit 1; }
v=$(PYTHONPATH="$SITE" "$PY" -c "import importlib.metadata as m; print(m.version('vllm'))") || exit 1
echo "$KIT_SHA256" > "$KIT_DIR/.installed"
rm -f "$KIT_DIR"/part*   # the installed tree is what matters now; frees about 230 MB
echo "KIT READY (vllm $v in $SITE; now: source bench/gpu/env.sh)"
exit 0
