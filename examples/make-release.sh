#!/bin/sh
# Builds app-VERSION.tar.gz: a tiny "application" with a health check.
#   sh examples/make-release.sh 1.0.0          # healthy
#   sh examples/make-release.sh 2.0.0 broken   # its health check fails (to see a rollback)
set -eu
version=$1
dir=$(mktemp -d)
echo "$version" > "$dir/VERSION"
if [ "${2:-}" = broken ]; then
  printf '#!/bin/sh\necho "app %s: cannot open database" >&2\nexit 1\n' "$version" > "$dir/health.sh"
else
  printf '#!/bin/sh\necho "app %s: ok"\n' "$version" > "$dir/health.sh"
fi
chmod +x "$dir/health.sh"
tar czf "app-$version.tar.gz" -C "$dir" .
rm -rf "$dir"
echo "app-$version.tar.gz"
