"""Links between lab hosts for the tests that build their own topology."""

from __future__ import annotations

import secrets

from offloader.lab import Host, _run


def wire(a: Host, a_dev: str, b: Host, b_dev: str) -> None:
    """A veth pair from ``a`` (``a_dev``) to ``b`` (``b_dev``), both ends up,
    set as offloaded packet counts need them: complete checksums
    (CHECKSUM_PARTIAL does not survive an XDP redirect on veth), no TSO/GSO
    (packet counts mean packets), GRO on (veth delivers XDP redirects only
    then)."""
    x, y = f"v{secrets.token_hex(4)}", f"v{secrets.token_hex(4)}"
    _run(["ip", "link", "add", x, "type", "veth", "peer", "name", y])
    _run(["ip", "link", "set", x, "netns", a.name, "name", a_dev])
    _run(["ip", "link", "set", y, "netns", b.name, "name", b_dev])
    for host, dev in ((a, a_dev), (b, b_dev)):
        host.sh(f"ip link set {dev} up && ethtool -K {dev} tx off tso off gso off gro on >/dev/null")
