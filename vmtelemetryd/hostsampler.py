"""One hypervisor: its domains split over ``STATS_SHARDS`` connections, asked at the same time.

libvirtd asks the QEMU monitors of one request's domains one after another,
so a bulk request lasts as long as all its domains together; shares asked on
connections of their own are answered side by side (LAB.md: 61 guests, one
request 240-258 ms, four shares 144-172 ms on two CPUs). Each share is a
``Sampler``: its own timeout, NOWAIT and reconnects, so that a domain whose
monitor hangs stalls only its own share. ``auto`` keeps one share (the plain
``getAllDomainStats``) while a host has few domains, where a second
connection and thread would cost more than they save (``auto_shards``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

from vmtelemetryd.model import Sample
from vmtelemetryd.sampler import Release, Sampler
from vmtelemetryd.timedcalls import SamplerError, SamplerStuck

AUTO_DOMAINS_PER_SHARD = 50
AUTO_MAX_SHARDS = 4
AUTO_RULE = f"one share per full {AUTO_DOMAINS_PER_SHARD} domains, at most {AUTO_MAX_SHARDS}"


def auto_shards(domains: int) -> int:
    """``STATS_SHARDS=auto`` for a host with ``domains`` domains, from what the lab measured.

    bench/bench_shards.py, 200 paused guests on two CPUs, against one bare call:
    4 shares 0.60x its wall time at 1.04x its host CPU; 8 shares 0.57-0.59x at
    1.14-1.16x. bench/bench_cycle.py, 60 guests: one request 228 ms, a quarter
    of a 1 s interval, at 0.087 ms of the daemon's own CPU per VM-sample; two
    shares 181 ms at 0.110 ms. Below 100 domains a share saves little time and
    costs a quarter more of our own CPU.
    """
    return max(1, min(AUTO_MAX_SHARDS, domains // AUTO_DOMAINS_PER_SHARD))


class HostSampler:
    """Yields one ``Sample`` of the host per call, merged from its shares."""

    def __init__(
        self,
        uri: str,
        *,
        shards: int | None,
        timeout: float,
        wants_domain: Callable[[str], bool],
        filtered: bool,
        host_tag: str | None,
        on_connect: Callable[[Any, str], Release] | None = None,
    ) -> None:
        self.uri = uri
        self._fixed = shards
        self._timeout = timeout
        self._wants_domain = wants_domain
        self._filtered = filtered
        self._host_tag = host_tag
        self._on_connect = on_connect
        self._shards: list[Sampler] = []
        self._retired_reconnects = 0
        self._domains = 0
        self.share_error: str | None = None  # a share that failed while the others answered
        self._resize(shards or 1)

    @property
    def shards(self) -> int:
        return len(self._shards)

    @property
    def connected(self) -> bool:
        return all(shard.connected for shard in self._shards)

    @property
    def reconnects(self) -> int:
        return self._retired_reconnects + sum(shard.reconnects for shard in self._shards)

    def sample(self) -> Sample:
        self._resize(self._wanted())
        sample = self._shards[0].sample() if len(self._shards) == 1 else self._sample_shares()
        self._domains = len(sample.vms)
        return sample

    def domain_xml(self, uuids: Sequence[str]) -> dict[str, str]:
        """Each share reads the domains it sampled last."""
        xml: dict[str, str] = {}
        for shard in self._shards:
            xml |= shard.domain_xml(uuids)
        return xml

    def close(self) -> None:
        for shard in self._shards:
            shard.close()

    def _sample_shares(self) -> Sample:
        results: list[Sample | SamplerError | None] = [None] * len(self._shards)

        def take(index: int, shard: Sampler) -> None:
            try:
                results[index] = shard.sample()
            except SamplerError as exc:
                results[index] = exc

        threads = [
            threading.Thread(target=take, args=(i, shard), name=f"share-{i}", daemon=True)
            for i, shard in enumerate(self._shards)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()  # each share's calls end within the timeout
        samples = [r for r in results if isinstance(r, Sample)]
        errors = [r for r in results if isinstance(r, SamplerError)]
        self.share_error = "; ".join(str(e) for e in errors) or None
        if not samples:
            stuck = [e for e in errors if isinstance(e, SamplerStuck)]
            raise (stuck or errors)[0]
        first = min(samples, key=lambda s: s.monotonic)
        vms = tuple(vm for s in samples for vm in s.vms)
        return Sample(host=first.host, wall_ns=first.wall_ns, monotonic=first.monotonic, vms=vms)

    def _wanted(self) -> int:
        if self._fixed is not None:
            return self._fixed
        return auto_shards(self._domains)

    def _resize(self, count: int) -> None:
        """Keep the connections that exist (new shares of the same hosts), open or close the rest.

        Events are registered on the first connection only: one set per host.
        """
        while len(self._shards) > count:
            retired = self._shards.pop()
            retired.close()
            self._retired_reconnects += retired.reconnects
        while len(self._shards) < count:
            first = not self._shards
            self._shards.append(
                Sampler(
                    self.uri,
                    timeout=self._timeout,
                    wants_domain=self._wants_domain,
                    filtered=self._filtered,
                    host_tag=self._host_tag,
                    on_connect=self._on_connect if first else None,
                )
            )
        for index, shard in enumerate(self._shards):
            shard.share = (index, count)
