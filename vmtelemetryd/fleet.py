"""Every hypervisor of ``LIBVIRT_URI``, sampled at the same time; a slow one makes no other wait.

Each host has a worker thread that takes one request at a time. A cycle asks
every host that is not still busy and waits for the answers until its
deadline. A host that answers later is collected by the next cycle (its
sample is stamped when it was taken, so its points land where they belong);
meanwhile it is not asked again, so a hung libvirtd gets no pile of requests.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from vmtelemetryd.hostsampler import HostSampler
from vmtelemetryd.model import Sample
from vmtelemetryd.timedcalls import SamplerError


@dataclass(frozen=True, slots=True)
class HostResult:
    """One host's answer: a sample, or why there is none."""

    uri: str
    sample: Sample | None
    error: SamplerError | None
    duration_s: float


class _Worker:
    def __init__(self, sampler: HostSampler, results: queue.SimpleQueue[HostResult]) -> None:
        self.sampler = sampler
        self._results = results
        self._asked = threading.Semaphore(0)
        self._closing = False
        thread = threading.Thread(target=self._run, name=f"host {sampler.uri}", daemon=True)
        thread.start()

    def ask(self) -> None:
        self._asked.release()

    def close(self) -> None:
        """Ends the thread once it is idle; one stuck in libvirt is left behind, not joined."""
        self._closing = True
        self._asked.release()

    def _run(self) -> None:
        while True:
            self._asked.acquire()
            if self._closing:
                self.sampler.close()
                return
            started = time.monotonic()
            sample: Sample | None = None
            error: SamplerError | None = None
            try:
                sample = self.sampler.sample()
            except SamplerError as exc:
                error = exc
            self._results.put(
                HostResult(self.sampler.uri, sample, error, time.monotonic() - started)
            )


class Fleet:
    def __init__(self, samplers: Sequence[HostSampler]) -> None:
        self._results: queue.SimpleQueue[HostResult] = queue.SimpleQueue()
        self._workers = {s.uri: _Worker(s, self._results) for s in samplers}
        self.busy: set[str] = set()  # asked, not answered yet

    @property
    def samplers(self) -> list[HostSampler]:
        return [worker.sampler for worker in self._workers.values()]

    def sample(self, deadline: float) -> list[HostResult]:
        """Ask every idle host; the answers that came by ``deadline``, late ones included."""
        asked = [uri for uri in self._workers if uri not in self.busy]
        for uri in asked:
            self.busy.add(uri)
            self._workers[uri].ask()
        answers: list[HostResult] = []
        waiting = set(asked)
        while waiting:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                answer = self._results.get(timeout=left)
            except queue.Empty:
                break
            answers.append(answer)
            waiting.discard(answer.uri)
            self.busy.discard(answer.uri)
        while True:  # an earlier cycle's late answers, if they came meanwhile
            try:
                answer = self._results.get_nowait()
            except queue.Empty:
                break
            answers.append(answer)
            self.busy.discard(answer.uri)
        return answers

    def close(self) -> None:
        for worker in self._workers.values():
            worker.close()
