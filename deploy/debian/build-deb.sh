#!/bin/sh
# Builds ferry_VERSION_amd64.deb from a release binary (make deb runs this):
#   deploy/debian/build-deb.sh BINARY OUTDIR
# The binary has the Swift runtime linked in (--static-swift-stdlib): the package depends only
# on Debian's libraries (found by dpkg-shlibdeps), not on a Swift toolchain.
set -eu
binary=$1
out=$2
root=$(cd "$(dirname "$0")/../.." && pwd)
version=$("$binary" --version | sed -n 's/^ferry \([^ ]*\) .*/\1/p')
[ -n "$version" ] || { echo "build-deb: cannot read the version from $binary --version" >&2; exit 1; }
arch=$(dpkg --print-architecture)
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
pkg=$stage/ferry_${version}_$arch

install -d "$pkg/DEBIAN" "$pkg/usr/bin" "$pkg/lib/systemd/system" "$pkg/usr/share/ferry/prometheus" \
    "$pkg/usr/share/doc/ferry/examples" "$pkg/usr/share/man/man1" "$pkg/usr/share/lintian/overrides"
install -m 0644 "$root/deploy/debian/lintian-overrides" "$pkg/usr/share/lintian/overrides/ferry"
install -m 0755 "$binary" "$pkg/usr/bin/ferry"
strip --strip-unneeded --remove-section=.comment --remove-section=.note "$pkg/usr/bin/ferry"
install -m 0644 "$root/deploy/systemd/ferry@.service" "$pkg/lib/systemd/system/ferry@.service"
install -m 0644 "$root/deploy/prometheus/ferry-rules.yml" "$pkg/usr/share/ferry/prometheus/ferry-rules.yml"
install -m 0644 "$root/deploy/prometheus/ferry-rules.test.yml" "$pkg/usr/share/ferry/prometheus/ferry-rules.test.yml"
install -m 0644 "$root/deploy/debian/east.yaml" "$pkg/usr/share/doc/ferry/examples/east.yaml"
for doc in README.md docs/configuration.md docs/operations.md docs/monitoring.md docs/replication.md docs/trees.md BENCHMARKS.md; do
    install -m 0644 "$root/$doc" "$pkg/usr/share/doc/ferry/$(basename "$doc")"
done
install -m 0644 "$root/deploy/debian/copyright" "$pkg/usr/share/doc/ferry/copyright"
sed "s/@VERSION@/$version/; s/@DATE@/$(date -R -u -d @"${SOURCE_DATE_EPOCH:-$(git -C "$root" log -1 --format=%ct 2>/dev/null || date +%s)}")/" \
    "$root/deploy/debian/changelog" | gzip -9n > "$pkg/usr/share/doc/ferry/changelog.gz"
chmod 0644 "$pkg/usr/share/doc/ferry/changelog.gz"
gzip -9n -c "$root/deploy/debian/ferry.1" > "$pkg/usr/share/man/man1/ferry.1.gz"
chmod 0644 "$pkg/usr/share/man/man1/ferry.1.gz"

# Shared-library dependencies, as Debian's own packages get them.
mkdir -p "$stage/src/debian"
printf 'Source: ferry\n\nPackage: ferry\nArchitecture: any\n' > "$stage/src/debian/control"
depends=$(cd "$stage/src" && dpkg-shlibdeps -O "$pkg/usr/bin/ferry" 2>/dev/null | sed -n 's/^shlibs:Depends=//p')
[ -n "$depends" ] || { echo "build-deb: dpkg-shlibdeps found no dependencies" >&2; exit 1; }
size=$(du -sk --exclude=DEBIAN "$pkg" | cut -f1)
sed "s/@VERSION@/$version/; s/@ARCH@/$arch/; s/@DEPENDS@/$depends/; s/@SIZE@/$size/" \
    "$root/deploy/debian/control" > "$pkg/DEBIAN/control"
install -m 0755 "$root/deploy/debian/postinst" "$pkg/DEBIAN/postinst"
install -m 0755 "$root/deploy/debian/postrm" "$pkg/DEBIAN/postrm"
install -m 0755 "$root/deploy/debian/prerm" "$pkg/DEBIAN/prerm"
(cd "$pkg" && find usr lib -type f -exec md5sum {} + | sort -k2) > "$pkg/DEBIAN/md5sums"
chmod 0644 "$pkg/DEBIAN/md5sums" "$pkg/DEBIAN/control"

mkdir -p "$out"
dpkg-deb --root-owner-group -Zxz --build "$pkg" "$out/ferry_${version}_$arch.deb" >/dev/null
echo "$out/ferry_${version}_$arch.deb"
