#!/usr/bin/env bash
# Debian packages the tests and the sandbox fleet use. Idempotent; a no-op for what is present.
# Without root it only reports what is missing (the tests then skip what needs it, and say so).
#   openssh-server/-client  real sshd servers for the fleet tests (apt does not start the service)
#   iproute2, nftables      network namespaces, veth, tc tbf/htb, random-drop loss rules
#   qemu-user-static, binfmt-support, arch-test   run arm64/armhf roots through binfmt_misc
#   mmdebstrap, zstd        build the Debian device roots and cache them as tar.zst
#   util-linux              setarch (i686 personality for the Edison stand-in), nsenter
#   procps                  ps/pgrep, handy when a sandbox device misbehaves
#   python3-numpy           the x86 sandbox devices run Debian's python3 + numpy, like the roots
#   (onnxruntime for the x86 and arm64 sandbox devices is no Debian package: Debian 12 has none.
#   The sandbox fetches PyPI's wheels itself with the venv's pip (`pip download`, cached in
#   ~/.cache/deepfleet/wheels) and unpacks them; it needs nothing more from apt.)
#   chromium, chromium-driver  headless browser tests of the HTML report (Selenium drives
#                           /usr/bin/chromedriver; nothing is downloaded)
set -euo pipefail
pkgs=(openssh-server openssh-client iproute2 nftables qemu-user-static binfmt-support
      mmdebstrap arch-test zstd util-linux procps ca-certificates python3-numpy
      chromium chromium-driver)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then exit 0; fi
if [ "$(id -u)" != 0 ]; then
  echo "system-deps: not root; missing Debian packages: ${missing[*]} (tests that need them will skip)" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "system-deps: installed ${missing[*]}"
