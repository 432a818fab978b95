"""The status page in a real browser, following a rollback that runs step by step.

Headless Chromium (Debian's /usr/bin/chromium, driven by Playwright; no
browser is ever downloaded) loads the page from an in-process aiohttp server
over a real ledger and engine. The rollback's compensations wait until the
test releases them one by one, so the page must show the progress move.
Screenshots land in the test's tmp_path and their paths are printed (-s).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from aiohttp.test_utils import TestServer
from playwright.async_api import Browser, Page, async_playwright, expect

from consumers.api import build_web_app
from consumers.settings import Settings
from schemas.dlq import DeadLetter
from schemas.signal import RollbackSignal
from tests.support.api_runtime import ApiRuntime, Controls, driven_saga
from tests.support.names import unique_name
from tests.support.waiting import wait_for

pytestmark = pytest.mark.e2e

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]
PHONE = {"width": 390, "height": 844}
DEPLOYMENT = "shop-2.4.0-7f3a"


@pytest.fixture
def chromium() -> Path:
    """Debian's Chromium; its absence fails the test (never a skip, never a download)."""
    if not CHROMIUM.exists():
        pytest.fail(
            f"{CHROMIUM} is missing: install Debian's chromium (apt-get install chromium); "
            "these tests never download a browser",
            pytrace=False,
        )
    return CHROMIUM


@pytest.fixture
async def browser(chromium: Path) -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=str(chromium), headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield browser
        finally:
            await browser.close()


async def _signal(runtime: ApiRuntime, deployment_id: str, reason: str) -> str:
    signal = RollbackSignal(
        signal_id=str(uuid.uuid4()),
        deployment_id=deployment_id,
        issued_at=datetime.now(UTC),
        reason=reason,
        requested_by="alertmanager",
    )
    await runtime.engine.handle_signal(signal)
    return signal.signal_id


async def _shot(page: Page, path: Path) -> Path:
    await page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")
    return path


async def test_status_page_follows_a_running_rollback(
    browser: Browser, kafka_bootstrap: str, sqlite_url: str, tmp_path: Path
) -> None:
    settings = Settings(
        broker=f"kafka://{kafka_bootstrap}",
        database_url=sqlite_url,
        topic_prefix=unique_name("page") + ".",
    )
    controls = Controls()
    runtime = await ApiRuntime.open(settings, [driven_saga(controls)])
    server = TestServer(build_web_app(settings, runtime), host="127.0.0.1")
    await server.start_server()
    try:
        # A failed rollback of another deployment and a dead letter, for context.
        await runtime.track("payments-3.1.0", "Broken", service="payments", version="3.1.0")
        failed_id = await _signal(runtime, "payments-3.1.0", "PaymentsLatency: p99 above 2s")
        await runtime.ledger.record_dead_letters(
            [
                DeadLetter(
                    error="invalid EventEnvelope: occurred_at: Field required",
                    source_topic="orders.events",
                    source_partition=2,
                    source_offset=1841,
                )
            ],
            now=datetime.now(UTC),
        )
        # The rollback under test: three compensations that wait for the test.
        await runtime.track(
            DEPLOYMENT, "Step", "Step", "Step", "Emailed", service="shop", version="2.4.0"
        )
        rollback_id = await _signal(runtime, DEPLOYMENT, "OrdersErrorRate: 5xx above 5%")
        await wait_for(lambda: len(controls.started) == 3, message="three compensations started")

        page = await browser.new_page(viewport={"width": 1280, "height": 900})
        await page.goto(str(server.make_url("/")))
        card = page.locator(f'[data-rollback-id="{rollback_id}"]')
        text = card.locator(".progress-text")
        bar = card.get_by_role("progressbar")
        await expect(text).to_have_text("0 of 3 compensations done (0%)")
        await expect(bar).to_have_attribute("aria-valuenow", "0")
        await expect(card.locator(".badge")).to_have_text("running")
        await expect(page.locator(f'[data-rollback-id="{failed_id}"] .badge')).to_have_text(
            "failed"
        )
        await expect(page.locator("#deployments tbody tr")).to_have_count(2)
        await expect(page.locator("#dead-letters tbody")).to_contain_text("occurred_at")

        controls.release(1)
        await expect(text).to_have_text("1 of 3 compensations done (33%)")
        await expect(bar).to_have_attribute("aria-valuenow", "1")
        running_shot = await _shot(page, tmp_path / "overview-running.png")

        await card.locator("a.rollback-link").click()
        await page.wait_for_url(f"**/rollbacks/{rollback_id}")
        head = page.locator("#rollback-head")
        await expect(head.locator(".progress-text")).to_have_text("1 of 3 compensations done (33%)")
        rows = page.locator("#compensations tbody tr")
        await expect(rows).to_have_count(3)
        await expect(rows.locator(".badge")).to_have_text(["applied", "running", "running"])
        await expect(page.locator("#manual-actions")).to_contain_text(
            "Send the customer a correction e-mail"
        )

        controls.release(1)
        await expect(head.locator(".progress-text")).to_have_text("2 of 3 compensations done (66%)")
        controls.release(1)
        await expect(head.locator(".progress-text")).to_have_text(
            "3 of 3 compensations done (100%)"
        )
        await expect(head.locator(".badge")).to_have_text("completed with warnings")
        await expect(rows.locator(".badge")).to_have_text(["applied"] * 3)
        detail_shot = await _shot(page, tmp_path / "detail-completed.png")

        phone = await browser.new_page(viewport=PHONE, is_mobile=True, has_touch=True)
        await phone.goto(str(server.make_url("/")))
        phone_card = phone.locator(f'[data-rollback-id="{rollback_id}"]')
        await expect(phone_card).to_be_visible()
        await expect(phone_card.locator(".progress-text")).to_have_text(
            "3 of 3 compensations done (100%)"
        )
        await expect(phone_card.locator(".badge")).to_have_text("completed with warnings")
        box = await phone_card.bounding_box()
        assert box is not None
        assert box["x"] >= 0
        assert box["x"] + box["width"] <= PHONE["width"]
        # Nothing wider than the screen: no sideways scrolling on a phone.
        assert await phone.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
        phone_shot = await _shot(phone, tmp_path / "phone-overview.png")

        await phone.goto(str(server.make_url(f"/rollbacks/{rollback_id}")))
        await expect(phone.locator("#compensations tbody tr")).to_have_count(3)
        assert await phone.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
        phone_detail_shot = await _shot(phone, tmp_path / "phone-detail.png")

        for shot in (running_shot, detail_shot, phone_shot, phone_detail_shot):
            assert shot.stat().st_size > 10_000
    finally:
        controls.release(10)
        await server.close()
        await runtime.close()
