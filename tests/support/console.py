"""The console under a real browser: the service served by uvicorn on 127.0.0.1 (a free
port) in a thread of the test, Debian's Chromium driven by Playwright, and a virtual
WebAuthn authenticator per browser context (Chrome DevTools Protocol), so passkeys are
created and used as on a real device, with no person to touch it."""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from playwright.sync_api import Browser, BrowserContext, Page
from support.served import served as serve_in_thread
from support.world import World

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    # The console's origin is http://localhost:<port> (WebAuthn wants a domain name) and
    # the service listens on 127.0.0.1 only: no detour through ::1.
    "--host-resolver-rules=MAP localhost 127.0.0.1",
]
SCREENSHOTS = Path(__file__).resolve().parents[2] / ".cache" / "screenshots"


def served(app: Any, port: int) -> AbstractContextManager[str]:
    """`app` served on 127.0.0.1:`port` and reached as `localhost` (passkeys need a name)."""
    return serve_in_thread(app, port, host_name="localhost")


@dataclass
class Person:
    """One person's browser: its own context (cookies) and its own authenticator."""

    who: str
    context: BrowserContext
    page: Page
    authenticator_id: str

    def credentials(self) -> list[dict[str, Any]]:
        cdp = self.context.new_cdp_session(self.page)
        answer: dict[str, Any] = cdp.send(
            "WebAuthn.getCredentials", {"authenticatorId": self.authenticator_id}
        )
        return list(answer["credentials"])


def new_person(browser: Browser, who: str) -> Person:
    context = browser.new_context(accept_downloads=True, viewport={"width": 1280, "height": 900})
    context.set_default_timeout(15_000)
    page = context.new_page()
    cdp = context.new_cdp_session(page)
    cdp.send("WebAuthn.enable", {"enableUI": False})
    added = cdp.send(
        "WebAuthn.addVirtualAuthenticator",
        {
            "options": {
                "protocol": "ctap2",
                "transport": "internal",
                "hasResidentKey": True,
                "hasUserVerification": True,
                "isUserVerified": True,
                "automaticPresenceSimulation": True,
            }
        },
    )
    return Person(who, context, page, str(added["authenticatorId"]))


@dataclass
class Console:
    """A populated service (`World`: one principal per role) and its console's URL."""

    world: World
    url: str
    browser: Browser

    def invitation(self, who: str) -> str:
        """An admin's invitation link for `who`, through the API route."""
        principal_id = self.world.call(who, "GET", "/v1/me").json()["id"]
        r = self.world.call("admin", "POST", f"/v1/principals/{principal_id}/invitations")
        assert r.status_code == 201, r.text
        url: str = r.json()["url"]
        assert url.startswith(f"{self.url}/console/invite/")
        return url

    def enrol(self, who: str) -> Person:
        """`who` opens their invitation, registers a passkey and lands signed in."""
        person = new_person(self.browser, who)
        person.page.goto(self.invitation(who))
        person.page.click("#register")
        person.page.wait_for_url(f"{self.url}/console/loans")
        return person

    def sign_in(self, person: Person) -> None:
        person.page.goto(f"{self.url}/console/sign-in")
        person.page.click("#sign-in")
        person.page.wait_for_url(f"{self.url}/console/loans")


def screenshot(page: Page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)
