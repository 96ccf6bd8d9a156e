#!/usr/bin/env bash
# Install the Debian packages in setup/system-packages.txt that are missing (apt-get update once, then one
# apt-get install). As root it installs; otherwise it prints the one `sudo apt-get install ...` line and
# what will not run without those packages, and exits 0 so the caller goes on with what can run
# (with CI=true a missing package is an error: CI runs everything).
#   setup/system-packages.sh           install what is missing
#   setup/system-packages.sh --check   only say what is missing (exit 1 if anything is)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
list="$here/system-packages.txt"
check_only=false
[ "${1:-}" = "--check" ] && check_only=true

declare -A purpose=()
packages=()
while read -r name why; do
  case "$name" in ''|'#'*) continue ;; esac
  packages+=("$name")
  purpose[$name]="$why"
done < "$list"

if ! command -v dpkg-query >/dev/null; then
  echo "system packages: not a Debian-based system (no dpkg-query); install the equivalents of:" >&2
  echo "  ${packages[*]}" >&2
  echo "  (see $list for what each is for); tests that need one are skipped, with the reason" >&2
  exit 0
fi

missing=()
for name in "${packages[@]}"; do
  status="$(dpkg-query -W -f='${db:Status-Status}' "$name" 2>/dev/null || true)"
  [ "$status" = installed ] || missing+=("$name")
done
[ ${#missing[@]} -eq 0 ] && exit 0

explain() {
  echo "without them, these will not run (tests skipped with the reason; CI=true fails instead):" >&2
  for name in "${missing[@]}"; do echo "  $name: ${purpose[$name]}" >&2; done
}

if $check_only; then
  echo "system packages missing: ${missing[*]}" >&2
  explain
  exit 1
fi

if [ "$(id -u)" -ne 0 ]; then
  echo "system packages missing; as root, or with sudo, run:" >&2
  echo >&2
  echo "  sudo apt-get update && sudo apt-get install -y --no-install-recommends ${missing[*]}" >&2
  echo >&2
  explain
  [ "${CI:-}" = true ] && { echo "CI=true: every package is required" >&2; exit 1; }
  exit 0
fi

echo "installing system packages: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
if ! apt-get update -qq; then
  echo "error: apt-get update failed: the Debian package index cannot be reached (network, /etc/apt/sources.list)" >&2
  exit 1
fi
if ! apt-get install -y -qq --no-install-recommends "${missing[@]}" >/tmp/edgeloop-apt.log 2>&1; then
  tail -20 /tmp/edgeloop-apt.log >&2
  echo "error: apt-get install ${missing[*]} failed (full log: /tmp/edgeloop-apt.log)" >&2
  exit 1
fi
echo "installed: ${missing[*]}"
