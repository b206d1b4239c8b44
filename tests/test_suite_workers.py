"""The suite's xdist workers (scripts/test.sh) start servers at the same time: their ports must never meet."""

from __future__ import annotations

import itertools
import socket

import pytest

from tests import conftest
from tests.conftest import free_port, own_port_block, port_block


@pytest.mark.parametrize("workers", [1, 2, 16, 64])
def test_each_process_of_a_run_has_a_port_block_of_its_own(workers: int) -> None:
    blocks = [port_block("", workers)] + [port_block(f"gw{i}", workers) for i in range(workers)]
    ports = [p for b in blocks for p in b]
    assert all(len(b) >= 100 for b in blocks)
    assert len(set(ports)) == len(ports)  # no two processes share a port
    assert min(ports) >= 1024 and max(ports) < 32768  # not privileged, below the kernel's ephemeral ports


def test_free_port_draws_from_its_block_and_skips_a_held_port(monkeypatch: pytest.MonkeyPatch) -> None:
    # this process's own block (no other test process draws from it, so holding a port here races nobody)
    block = own_port_block()
    port = free_port()  # free now (an earlier test's server may have left a port of the block closing)
    monkeypatch.setattr(conftest, "_PORT_CALLS", itertools.count(block.index(port)))  # the next call tries it
    with socket.socket() as held:
        held.bind(("127.0.0.1", port))
        drawn = [free_port() for _ in range(20)]
    assert port not in drawn
    assert len(set(drawn)) == len(drawn) and set(drawn) <= set(block)
