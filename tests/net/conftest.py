from __future__ import annotations

import pytest
from tests import netlink


@pytest.fixture(autouse=True)
def link_tools() -> None:
    """These tests build namespaces and shape veths: without root, ip or tc they fail,
    saying why (CI runs as root and ``.ci/run`` installs iproute2)."""
    try:
        netlink.require_tools()
    except netlink.LinkError as exc:
        pytest.fail(str(exc), pytrace=False)
