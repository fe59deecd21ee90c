"""A real browser (Debian's headless Chromium through Playwright) labels pairs by clicks and keys, undo included;
signs in by clicking the link on another site; and is not switched to another account by a third-party page.

Set PERLHF_LABEL_SCREENSHOT=docs/label.png to save the screenshot used in docs/label.md.
"""

from __future__ import annotations

import html
import json
import os
import sqlite3
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

# Playwright's expect polls with selectors; wait_for_function would need eval, which the page's CSP forbids.
expect = pytest.importorskip("playwright.sync_api").expect

from perlhf.label.cli import main
from perlhf.label.server import serving
from perlhf.label.store import LabelStore, Response

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
SCRIPT = "<script>alert(1)</script>"

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                reason=f"{CHROMIUM} missing: install Debian's chromium (apt-get install -y chromium)")

PAIRS = [
    ([{"role": "system", "content": "You are a concise assistant."},
      {"role": "user", "content": "How do I print the last 5 lines of a file in a shell?"}],
     "Use tail:\n\n    tail -n 5 notes.txt\n\nAdd -f to keep following the file as it grows.",
     "Open the file in an editor and scroll to the bottom, then count five lines up."),
    ("Explain in two sentences why the sky is blue.",
     "Sunlight is scattered by the molecules of the air, and blue light, with its short wavelength, is scattered "
     "far more than red. So wherever you look away from the sun, you see scattered blue light.",
     "Because it reflects the ocean. On days when the sea is calm the sky is bluer."),
    (f"Repeat after me: {SCRIPT}", f"{SCRIPT}", f"I would rather not run <b>markup</b>: {SCRIPT}"),
    ("What is 17 × 23?", "17 × 23 = 391.", "17 × 23 = 401."),
]


@pytest.fixture
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


def watched_page(browser, **options):
    """A page that records alerts, script errors and console errors (a CSP violation logs one)."""
    page = browser.new_page(**options)
    page.set_default_timeout(15_000)
    problems = []
    page.on("dialog", lambda dialog: (problems.append(f"dialog: {dialog.message}"), dialog.dismiss()))
    page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    page.on("console", lambda msg: problems.append(f"console: {msg.text}") if msg.type == "error" else None)
    return page, problems


def sign_in(page, link: str, url: str, home: str = "/") -> None:
    """Open a sign-in link as a person does: the page asks, they press the button."""
    page.goto(link)
    page.click("#sign-in")
    page.wait_for_url(f"{url}{home}")


@contextmanager
def third_party_site(pages: dict[str, str]):
    """Another site: a second server on loopback, reached as `localhost` (the label server is `127.0.0.1`, so
    for the browser it is another site, not only another origin)."""
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's naming)
            body = pages.get(self.path, "not found").encode()
            self.send_response(200 if self.path in pages else 404)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    pages = {"/favicon.ico": "", **pages}  # the browser asks for one
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://localhost:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_sign_in_by_clicking_the_link_on_another_site(tmp_path, browser):
    db = tmp_path / "labels.db"
    store, _ = LabelStore.open(db, create=True, durable=False)
    for prompt, a, b in PAIRS:
        store.add_pair(prompt, Response(a, "m"), Response(b, "m"))
    store.add_labeller("ann")
    with serving(db, stop_after=120) as url:
        link = f"{url}/signin?invite={store.invite('ann')}"
        mail = (f'<!doctype html><title>Webmail</title><p>Hi Ann, please label: '
                f'<a id="link" href="{html.escape(link)}">start labelling</a>. '
                f'Later: <a id="again" href="{url}/">the labelling page</a>.')
        with third_party_site({"/mail.html": mail}) as site:
            page, problems = watched_page(browser)
            page.goto(f"{site}/mail.html")
            page.click("#link")  # a real click from another site, not a typed address
            expect(page.locator("main")).to_contain_text("This link signs you in as ann")
            page.click("#sign-in")
            page.wait_for_url(f"{url}/")
            expect(page.locator("#name")).to_have_text("Labelling as ann")
            expect(page.locator("#left")).not_to_be_empty()
            page.reload()  # the session holds
            expect(page.locator("#name")).to_have_text("Labelling as ann")
            page.click("[data-choice=left]")
            expect(page.locator("#progress-text")).to_have_text("1 / 4")
            assert problems == []  # from here on the browser logs the error statuses it is shown
            # The used link is dead, in history or anywhere: opening it again signs nobody in.
            page.goto(f"{site}/mail.html")
            page.click("#link")
            expect(page.locator("body")).to_contain_text("This link is not valid (any more)")
            # A plain link from another site arrives signed in (SameSite=Lax).
            page.goto(f"{site}/mail.html")
            page.click("#again")
            expect(page.locator("#name")).to_have_text("Labelling as ann")
            expect(page.locator("#left")).not_to_be_empty()
            # Sign out: the page says so and the session is over on the server.
            page.click("#sign-out")
            expect(page.locator("h1")).to_have_text("Signed out")
            page.goto(f"{url}/")
            expect(page.locator("body")).to_contain_text("needs your personal link")
    con = sqlite3.connect(db)
    assert con.execute("SELECT count(*), count(revoked_at) FROM sessions").fetchone() == (1, 1)
    assert con.execute("SELECT count(*) FROM answers").fetchone()[0] == 1


def test_a_third_party_page_cannot_switch_the_signed_in_labeller(tmp_path, browser):
    db = tmp_path / "labels.db"
    store, _ = LabelStore.open(db, create=True, durable=False)
    store.add_pair("p", Response("x", "m"), Response("y", "m"))
    store.add_labeller("ann")
    store.add_labeller("mallory")
    mallory = store.invite("mallory")
    with serving(db, stop_after=120) as url:
        attack = (f'<!doctype html><title>Cats</title><a id="link" href="{url}/signin?invite={mallory}">cute cats</a>'
                  f'<form method="post" action="{url}/signin"><input type="hidden" name="invite" value="{mallory}">'
                  '<button id="post">more cats</button></form>')
        with third_party_site({"/cats.html": attack}) as site:
            page, _ = watched_page(browser)
            sign_in(page, f"{url}/signin?invite={store.invite('ann')}", url)
            expect(page.locator("#name")).to_have_text("Labelling as ann")

            # Sent to mallory's link: the page asks first and names both; staying keeps ann.
            page.goto(f"{site}/cats.html")
            page.click("#link")
            warning = page.locator(".warning")
            expect(warning).to_contain_text("You are signed in here as ann")
            expect(warning).to_contain_text("This link is for mallory")
            page.click("#stay")
            expect(page.locator("#name")).to_have_text("Labelling as ann")

            # A cross-site form post of mallory's link (what an auto-submitting page does) is refused.
            page.goto(f"{site}/cats.html")
            with page.expect_response(f"{url}/signin") as posted:
                page.click("#post")
            assert posted.value.status == 403
            expect(page.locator("body")).to_contain_text("cross-site request refused")
            page.goto(f"{url}/")
            expect(page.locator("#name")).to_have_text("Labelling as ann")
    again, _ = LabelStore.open(db)
    assert again.labeller_for_invite(mallory).name == "mallory"  # never used
    assert {p["name"]: p["sessions"] for p in again.labellers()} == {"admin": 0, "ann": 1, "mallory": 0}


def test_label_in_a_real_browser(tmp_path, browser):
    db = tmp_path / "labels.db"
    store, admin = LabelStore.open(db, create=True, durable=False)
    ids = [store.add_pair(prompt, Response(a, "SmolLM2-135M-Instruct"), Response(b, "SmolLM2-135M-Instruct",
                                                                                 "runs/policy/adapter"), 2)
           for prompt, a, b in PAIRS]
    store.add_labeller("ann"), store.add_labeller("bob")
    ann, bob, admin = (f"/signin?invite={store.invite(name)}" for name in ("ann", "bob", "admin"))

    with serving(db, stop_after=120) as url:
        page, problems = watched_page(browser, viewport={"width": 1200, "height": 600})
        sign_in(page, url + ann, url)
        assert page.url == f"{url}/"  # the code left the address bar
        progress = page.locator("#progress-text")

        def shown() -> tuple[str, str]:
            expect(page.locator("#left")).not_to_be_empty()
            return page.locator("#left").text_content(), page.locator("#right").text_content()

        # Pair 1, a chat prompt: one block per turn. Answer with a click.
        page.wait_for_selector("#prompt .turn")
        assert page.locator("#prompt .turn").count() == 2
        assert page.locator("#name").text_content() == "Labelling as ann"
        first = shown()
        page.click("[data-choice=left]")
        expect(page.locator("#progress-text")).to_have_text("1 / 4")

        # Pair 2: answer with the keyboard.
        second = shown()
        if os.environ.get("PERLHF_LABEL_SCREENSHOT"):
            page.screenshot(path=os.environ["PERLHF_LABEL_SCREENSHOT"], full_page=True)
        page.keyboard.press("2")
        expect(page.locator("#progress-text")).to_have_text("2 / 4")

        # Pair 3: markup in the prompt and both responses shows as text; nothing runs.
        third = shown()
        assert set(third) == {PAIRS[2][1], PAIRS[2][2]}
        assert page.locator("#prompt").text_content() == PAIRS[2][0]
        assert page.locator("#work script, #work b").count() == 0
        page.fill("#comment", "looks like an injection attempt")
        page.click("[data-choice=tie]")
        expect(page.locator("#progress-text")).to_have_text("3 / 4")
        assert page.locator("#comment").input_value() == ""

        # Undo with "u": pair 3 comes back with the previous answer marked and the comment restored.
        page.keyboard.press("u")
        expect(page.locator("#progress-text")).to_have_text("2 / 4")
        assert shown() == third
        assert page.locator("#comment").input_value() == "looks like an injection attempt"
        assert "previous" in page.locator("[data-choice=tie]").get_attribute("class")
        assert "Undid your answer" in page.locator("#status").text_content()
        page.keyboard.press("4")  # both bad this time
        expect(page.locator("#progress-text")).to_have_text("3 / 4")

        # Pair 4, then the end.
        fourth = shown()
        page.keyboard.press("1")
        page.wait_for_selector("#finished", state="visible")
        assert progress.text_content() == "4 / 4" and page.locator("#work").is_hidden()
        assert problems == []

        # On a phone the responses stack and the buttons stay on screen.
        phone, phone_problems = watched_page(browser, viewport={"width": 390, "height": 844}, is_mobile=True,
                                             has_touch=True)
        sign_in(phone, url + bob, url)
        expect(phone.locator("#left")).not_to_be_empty()
        left, right = phone.locator("#left").bounding_box(), phone.locator("#right").bounding_box()
        assert right["y"] >= left["y"] + left["height"] and right["width"] > 300
        assert phone.locator("[data-choice=both_bad]").bounding_box()["x"] + 10 < 390
        phone.tap("[data-choice=right]")
        expect(phone.locator("#progress-text")).to_have_text("1 / 4")
        assert phone_problems == []

        # The admin page fills its tables from the stats endpoint.
        overview, overview_problems = watched_page(browser)
        sign_in(overview, url + admin, url, "/admin")
        expect(overview.locator("#labellers tr")).to_have_count(4)  # header, admin, ann, bob
        expect(overview.locator("#agreement")).to_contain_text("Pairs with two or more answers: 1.")
        expect(overview.locator("#export-summary")).to_contain_text("would be exported")
        assert overview_problems == []

    # The database has every answer with its shown order, the undone one kept as history.
    con = sqlite3.connect(db)
    log = con.execute("SELECT pair_id, labeller, choice, shown_order, comment, undone, adapter_b FROM answer_log "
                      "ORDER BY answer_id").fetchall()
    assert [(row[0], row[1], row[5]) for row in log] == [
        (ids[0], "ann", 0), (ids[1], "ann", 0), (ids[2], "ann", 1), (ids[2], "ann", 0), (ids[3], "ann", 0),
        (ids[0], "bob", 0)]
    assert log[2][2] == "tie" and log[3][2] == "both_bad"
    assert log[3][4] == "looks like an injection attempt" and log[3][6] == "runs/policy/adapter"

    def expected_choice(texts, shown_pair, picked_left):
        a = texts[1]
        return "a" if (shown_pair[0 if picked_left else 1] == a) else "b"

    assert log[0][2] == expected_choice(PAIRS[0], first, True)
    assert log[1][2] == expected_choice(PAIRS[1], second, False)
    assert log[4][2] == expected_choice(PAIRS[3], fourth, True)
    assert [row[3] for row in log[:5]] == [("b,a" if s[0] == p[2] else "a,b")
                                           for s, p in ((first, PAIRS[0]), (second, PAIRS[1]), (third, PAIRS[2]),
                                                        (third, PAIRS[2]), (fourth, PAIRS[3]))]

    # Export: pair 1 has ann's and bob's answers, which may disagree (then no majority); pair 3 is both bad.
    out = tmp_path / "pairs.jsonl"
    assert main(["export", "--db", str(db), "--output", str(out)]) == 0
    exported = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    chosen = {json.dumps(r["prompt"]): r["chosen"] for r in exported}
    assert chosen[json.dumps(PAIRS[1][0])] == second[1]
    assert chosen[json.dumps(PAIRS[3][0])] == fourth[0]
    assert json.dumps(PAIRS[2][0]) not in chosen
    assert len(exported) in (2, 3)
