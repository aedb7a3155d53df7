#!/usr/bin/env bash
# Rebuilds this folder's images from cryptsetup's sources at the commit in README.md:
#   tests/data/cryptsetup/regenerate.sh /path/to/cryptsetup   (a checkout or a bare repo)
# Needs git, xz, jq, xxd and bash (the generators' own tools); the tests need none of them.
set -euo pipefail
src=$1
commit=38f95b7001c7680d29093e2a73aa389467deb9a0
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
git -C "$src" archive "$commit" tests/generators tests/luks2_valid_hdr.img.xz \
  | tar -x -C "$work"
images=(compatimage.img.xz compatimage2.img.xz compatv10image.img.xz blkid-luks2-pv.img.xz
        luks2_keyslot_unassigned.img.xz luks2_invalid_cipher.img.xz luks2_valid_hdr.img.xz
        evil_hdr-keyslot_overlap.xz evil_hdr-luks_hdr_damage.xz evil_hdr-payload_overwrite.xz
        evil_hdr-small_luks_device.xz evil_hdr-stripes_payload_dmg.xz valid_header_file.xz
        luks2_header_requirements.tar.xz luks2_mda_images.tar.xz luks1-images.tar.xz)
for f in "${images[@]}"; do
  git -C "$src" show "$commit:tests/$f" > "$here/$f"
done
git -C "$src" show "$commit:COPYING" > "$here/COPYING"
# luks2-validation-test's malformed headers, each made by one generator from the valid image
out=$work/out
mkdir "$out"
xz -dc "$work/tests/luks2_valid_hdr.img.xz" > "$out/luks2_valid_hdr.img"
cd "$work/tests/generators"
for g in ./generate-*.sh; do
  bash "$g" "$out" "$out/luks2_valid_hdr.img"
done
rm -rf "$here/luks2-validation"
mkdir "$here/luks2-validation"
for img in "$out"/luks2-*.img; do
  xz -9e -T1 -c "$img" > "$here/luks2-validation/$(basename "$img").xz"
done
