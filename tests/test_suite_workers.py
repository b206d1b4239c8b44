"""The suite's two xdist workers (scripts/test.sh) start servers at the same time: their ports must never meet."""

from __future__ import annotations

import socket

import pytest

from tests.conftest import free_port


def test_workers_draw_ports_from_blocks_of_their_own(monkeypatch: pytest.MonkeyPatch) -> None:
    drawn: dict[str, list[int]] = {}
    for worker in ["gw0", "gw1", "gw2"]:
        monkeypatch.setenv("PYTEST_XDIST_WORKER", worker)
        drawn[worker] = [free_port() for _ in range(20)]
    # every port once: no two calls, in one worker or two, hand out the same port
    ports = [p for block in drawn.values() for p in block]
    assert len(set(ports)) == len(ports)
    # per worker, a range no other worker's overlaps, below the kernel's ephemeral ports (it picks those itself)
    spans = sorted((min(block), max(block)) for block in drawn.values())
    assert all(hi < lo for (_, hi), (lo, _) in zip(spans, spans[1:]))
    assert spans[-1][1] < 32768
    # a port another process holds is skipped
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw5")
    nxt = free_port() + 1
    with socket.socket() as held:
        held.bind(("127.0.0.1", nxt))
        assert free_port() != nxt
