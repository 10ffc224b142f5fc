"""This host's network interfaces and addresses: the one FLAGCX_SOCKET_IFNAME names, the hostname's, the route to a peer."""

from __future__ import annotations

import ipaddress
import socket
from typing import Optional

from ..config import get as get_config
from ..errors import InvalidArgument

_SIOCGIFFLAGS = 0x8913
_SIOCGIFADDR = 0x8915
_IFF_UP = 0x1


def interface_addresses() -> dict[str, str]:
    """IPv4 address of every interface that is up and has one, by name, in the kernel's interface order."""
    import fcntl
    import struct

    found: dict[str, str] = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            request = struct.pack("256s", name.encode()[:15])
            try:
                (flags,) = struct.unpack("H", fcntl.ioctl(s.fileno(), _SIOCGIFFLAGS, request)[16:18])
                if flags & _IFF_UP:
                    found[name] = socket.inet_ntoa(fcntl.ioctl(s.fileno(), _SIOCGIFADDR, request)[20:24])
            except OSError:  # no IPv4 address
                continue
    return found


def _is_loopback(addr: str) -> bool:
    return ipaddress.ip_address(addr).is_loopback


def select_interface(spec: str, op: str = "init", rank: Optional[int] = None) -> tuple[str, str]:
    """(name, IPv4 address) of the first interface FLAGCX_SOCKET_IFNAME-style ``spec`` picks.

    NCCL syntax: comma-separated name prefixes; ``=`` first: exact names; ``^`` first:
    every interface except those (and except loopback ones). Raises InvalidArgument
    listing this host's interfaces when nothing matches.
    """
    text = spec.strip()
    exclude = text.startswith("^")
    text = text.removeprefix("^")
    exact = text.startswith("=")
    entries = [e.strip() for e in text.removeprefix("=").split(",") if e.strip()]
    available = interface_addresses()
    for name, addr in available.items():
        hit = any(name == e if exact else name.startswith(e) for e in entries)
        if hit != exclude and not (exclude and _is_loopback(addr)):
            return name, addr
    have = ", ".join(f"{n} ({a})" for n, a in available.items()) or "none"
    example = next((n for n, a in available.items() if not _is_loopback(a)), "eth0")
    raise InvalidArgument(
        f"FLAGCX_SOCKET_IFNAME={spec!r} matches no interface that is up with an IPv4 address on host {socket.gethostname()!r} "
        f"(interfaces here: {have}); set it to one of them, e.g. FLAGCX_SOCKET_IFNAME={example}",
        op=op,
        rank=rank,
    )


def hostname_address() -> Optional[str]:
    """The first non-loopback IPv4 address this host's name resolves to, or None."""
    try:
        infos = socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET, socket.SOCK_STREAM)
    except OSError:
        return None
    for info in infos:
        addr = str(info[4][0])
        if not _is_loopback(addr):
            return addr
    return None


def route_address(host: str) -> Optional[str]:
    """The local IPv4 address the kernel routes to ``host`` from (a UDP connect: nothing is sent), or None."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((host, 9))
            return s.getsockname()[0]
    except OSError:
        return None


def advertised_address() -> str:
    """The address other hosts should reach this one at: FLAGCX_SOCKET_IFNAME's, else the hostname's, else the first non-loopback interface's."""
    spec = get_config().socket_ifname
    if spec:
        return select_interface(spec)[1]
    addr = hostname_address()
    if addr is not None:
        return addr
    others = [a for a in interface_addresses().values() if not _is_loopback(a)]
    return others[0] if others else "127.0.0.1"
