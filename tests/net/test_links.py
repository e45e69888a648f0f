"""The emulated donor links: their rates, their round trip, and that they leave nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from tests import netlink
from tests.netlink import Links, ProbeServer, Profile

ROOT = Path(__file__).resolve().parents[2]


def _names_of(pid: int) -> list[str]:
    """The namespaces and host-side veths that process ``pid`` built."""
    names = []
    for name in netlink.namespaces():
        if (m := netlink.NAMESPACE_RE.match(name)) and int(m.group(1)) == pid:
            names.append(name)
    for name in netlink.interfaces():
        if (m := netlink.INTERFACE_RE.match(name)) and int(m.group(1)) == pid:
            names.append(name)
    return names


def test_a_cable_link_delivers_its_rate_each_way_and_its_round_trip() -> None:
    # Execute: about a second of bulk each way (2.5 MB up, 12.5 MB down) and 20 pings.
    measured = netlink.measure("cable", seconds=1.0, pings=30)
    # Assert: within the tolerance of a shaper on a shared 2-core machine. The fastest of
    # the pings bounds the relay's own overshoot; the median also carries the machine's
    # scheduling delays (19 ms at load 28; even the fastest was 15 ms late at load 30).
    assert 0.75 * 100 <= measured["down_mbit"] <= 1.1 * 100, measured
    assert 0.75 * 20 <= measured["up_mbit"] <= 1.1 * 20, measured
    assert 25 <= measured["rtt_ms_min"] <= 25 + 20, measured


def test_a_dsl_link_is_slower_up_than_down_by_its_profile() -> None:
    measured = netlink.measure("dsl", seconds=1.0, pings=10)
    assert 0.75 * 25 <= measured["down_mbit"] <= 1.1 * 25, measured
    assert 0.75 * 5 <= measured["up_mbit"] <= 1.1 * 5, measured
    assert 40 <= measured["rtt_ms_min"] <= 40 + 20, measured


def test_the_relay_adds_its_delay_without_capping_a_fast_link() -> None:
    # Prepare: 200 Mbit/s behind 40 ms. A relay that waited for each 256 KiB chunk to land
    # before reading the next would cap it at 256 KiB / 20 ms = 105 Mbit/s.
    fast_far = Profile("fast-far", 200, 200, 40)
    # Execute
    measured = netlink.measure(fast_far, seconds=1.5, pings=10)
    # Assert
    assert measured["down_mbit"] >= 0.75 * 200, measured
    assert measured["up_mbit"] >= 0.75 * 200, measured
    assert 40 <= measured["rtt_ms_min"] <= 40 + 20, measured


def test_each_link_has_its_own_namespace_address_and_relay() -> None:
    with ProbeServer() as server, Links() as links:
        a = links.open("cable", server.port)
        b = links.open("dsl", server.port)
        assert a.namespace != b.namespace and a.host_ip != b.host_ip
        assert a.relay is not None and b.relay is not None and a.relay.pid != b.relay.pid
        # Each namespace sees its own veth end and no one else's.
        shown = subprocess.run(
            [*a.exec_prefix, "ip", "-o", "addr"], capture_output=True, text=True, check=True
        ).stdout
        assert a.namespace_ip in shown and b.namespace_ip not in shown


def test_closing_the_links_leaves_no_namespace_veth_or_relay_behind() -> None:
    # Prepare
    with ProbeServer() as server:
        links = Links()
        opened = [links.open(name, server.port) for name in ("lan", "cable")]
        relays = [link.relay for link in opened]
        assert len(_names_of(os.getpid())) == 2 * 2  # a namespace and a host veth each
        # Execute
        links.close()
    # Assert
    assert _names_of(os.getpid()) == []
    assert all(relay is not None and relay.poll() is not None for relay in relays)


def test_a_link_that_fails_to_build_is_removed_whole() -> None:
    # Prepare: tc refuses a rate of zero, after the namespace and veth exist.
    broken = Profile("broken", 0, 0, 10)
    with ProbeServer() as server, Links() as links:
        # Execute
        with pytest.raises(netlink.LinkError, match="tc"):
            links.open(broken, server.port)
        # Assert
        assert _names_of(os.getpid()) == []
        assert links.links == []


def test_the_leftovers_of_a_crashed_run_are_removed_and_a_live_runs_are_not() -> None:
    with ProbeServer() as server, Links() as live:
        ours = live.open("cable", server.port)
        # Prepare: another process builds a link and dies without closing it (SIGKILL).
        crashed = subprocess.run(
            [
                sys.executable,
                "-c",
                "import os, signal, sys; sys.path.insert(0, '.'); from tests import netlink;"
                "links = netlink.Links(); links.open('dsl', 9);"
                "print(os.getpid(), flush=True); os.kill(os.getpid(), signal.SIGKILL)",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            cwd=ROOT,
        )
        dead_pid = int(crashed.stdout.split()[0])
        assert _names_of(dead_pid), "the crashed run should have left its link"
        # Execute
        removed = netlink.remove_leftovers()
        # Assert
        assert f"dpl-{dead_pid}-0" in removed
        assert _names_of(dead_pid) == []
        assert ours.namespace in netlink.namespaces()
        assert ours.host_interface in netlink.interfaces()
