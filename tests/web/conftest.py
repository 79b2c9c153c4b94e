"""Fixtures of the browser tests: one `deployd serve` world and one chromium per module,
and a test's own tabs (fresh cookies each), checked for JavaScript errors when it ends."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from playwright.sync_api import Browser

from tests.support.testenv import Infra
from tests.web.browser import Dashboard, Tabs, chromium, start_dashboard


@pytest.fixture(scope="module")
def dash(tmp_path_factory: pytest.TempPathFactory, testenv: Infra) -> Iterator[Dashboard]:
    """A real `deployd serve` with one push deploy and one webhook deploy done."""
    d = start_dashboard(tmp_path_factory.mktemp("dashboard"), testenv)
    yield d
    d.world.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Debian's chromium, headless (one per module: starting it takes a second or two)."""
    with chromium() as b:
        yield b


@pytest.fixture
def tabs(request: pytest.FixtureRequest, browser: Browser, dash: Dashboard) -> Iterator[Tabs]:
    """This test's tabs; the test fails on any JavaScript or console error they saw."""
    t = Tabs(browser, dash.base, request.node.name.removeprefix("test_"))
    yield t
    errors = t.errors()
    t.close()
    if errors:
        pytest.fail("JavaScript errors in the browser:\n" + "\n".join(errors), pytrace=False)
