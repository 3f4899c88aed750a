"""DNS-SD over mDNS (python-zeroconf): the discovery backend for networks that drop broadcast.

Why: office networks often filter broadcast but relay multicast DNS, and registering
``_devmesh._tcp.local.`` makes the mesh visible to standard tools (``avahi-browse
_devmesh._tcp``, macOS ``dns-sd -B _devmesh._tcp``). Each node registers one service
instance named ``NODENAME-ID8`` with its peer-channel port and the signed TXT record of
``core.wire`` (same fields, same checks as a datagram), and browses for the others. A
heartbeat is a TXT update (new time and counter); every received TXT is reported as a
sighting, and the registry checks it like a datagram.

Zeroconf is always pinned to the given IPv4 addresses (``interfaces=[...]``): it never
joins the multicast group on every interface of the machine. The removal of a service is
an unauthenticated packet, so it is not trusted as a goodbye: a signed goodbye TXT is
published before unregistering, and otherwise the peer expires on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from devmesh.mesh.discovery import MakeDatagram, Report, Sighting

SERVICE_TYPE = "_devmesh._tcp.local."
QUERY_TIMEOUT_MS = 3000

MakeTxt = Any
"""Callable[[str], dict[str, str]]: the signed TXT record naming an address."""


class MdnsBackend:
    """Register this node and browse for the others, pinned to ``addresses``."""

    name = "mdns"

    def __init__(
        self,
        *,
        addresses: list[str],
        instance: str,
        port: int,
        make_txt: MakeTxt,
    ) -> None:
        if not addresses:
            raise ValueError("mdns: no address to pin zeroconf to (refusing all interfaces)")
        self.addresses = addresses
        self.instance = instance
        self.port = port
        self.make_txt = make_txt
        self._zc: Any = None
        self._browser: Any = None
        self._info: Any = None
        self._report: Report | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.sent = 0

    async def start(self, report: Report) -> None:
        from zeroconf import IPVersion
        from zeroconf.asyncio import AsyncServiceBrowser, AsyncZeroconf

        self._report = report
        self._zc = AsyncZeroconf(interfaces=list(self.addresses), ip_version=IPVersion.V4Only)
        self._browser = AsyncServiceBrowser(
            self._zc.zeroconf, SERVICE_TYPE, handlers=[self._on_change]
        )

    def _on_change(self, zeroconf: Any, service_type: str, name: str, state_change: Any) -> None:
        from zeroconf import ServiceStateChange

        if state_change is ServiceStateChange.Removed or name == self._full_name():
            return
        task = asyncio.get_running_loop().create_task(self._resolve(service_type, name))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _resolve(self, service_type: str, name: str) -> None:
        from zeroconf.asyncio import AsyncServiceInfo

        info = AsyncServiceInfo(service_type, name)
        with contextlib.suppress(Exception):  # a peer that vanished mid-query: nothing to do
            if not await info.async_request(self._zc.zeroconf, QUERY_TIMEOUT_MS):
                return
        addresses = info.parsed_addresses()
        if self._report is not None and info.properties:
            self._report(
                Sighting(
                    backend=self.name,
                    source=addresses[0] if addresses else "",
                    txt=dict[object, object](info.properties.items()),
                )
            )

    def _full_name(self) -> str:
        return f"{self.instance}.{SERVICE_TYPE}"

    async def announce(self, make: MakeDatagram) -> None:
        """Publish (first call) or update the TXT record; ``make`` is unused (TXT, not bytes)."""
        from zeroconf.asyncio import AsyncServiceInfo

        info = AsyncServiceInfo(
            SERVICE_TYPE,
            self._full_name(),
            port=self.port,
            properties=self.make_txt(self.addresses[0]),
            server=f"{self.instance}.local.",
            parsed_addresses=list(self.addresses),
        )
        if self._info is None:
            await self._zc.async_register_service(info, allow_name_change=True)
        else:
            await self._zc.async_update_service(info)
        self._info = info
        self.sent += 1

    async def close(self) -> None:
        if self._zc is None:
            return
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._browser is not None:
            await self._browser.async_cancel()
        with contextlib.suppress(Exception):
            if self._info is not None:
                await self._zc.async_unregister_service(self._info)
        await self._zc.async_close()
        self._zc = None
