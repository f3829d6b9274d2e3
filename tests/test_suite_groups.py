"""The suite's own assumption: under `make test` (pytest-xdist, --dist loadgroup) the
tests of one xdist_group run on one worker, sharing what the group starts (the contract's
Ray, test_cluster's cluster, the watched security jobs). pytest-xdist marks a grouped
test by its node id's "@group" suffix; with pytest 9.2 it silently stopped doing so
(pytest-xdist#1386), and each worker started its own Ray."""

from __future__ import annotations

import pytest


@pytest.mark.xdist_group("the-suites-own")
def test_a_grouped_test_is_scheduled_as_its_group(request):
    if not getattr(request.config.option, "loadgroup", False):
        pytest.skip("not run with --dist loadgroup")
    assert request.node.nodeid.endswith("@the-suites-own"), request.node.nodeid
