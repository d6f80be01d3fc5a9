"""The labeling page in a real headless Chromium (Debian chromium + chromium-driver, driven by Selenium),
against a real ``rlhf serve feedback --labeling-port 0`` process on an SQLite store.

Saves screenshots of the labeling page and the overview (docs/img/, shown in the README, when
RLHF_UPDATE_SCREENSHOTS=1).
"""

from __future__ import annotations

import json
import os
import tempfile
import urllib.request
from pathlib import Path

import pytest

from rlhf.core.launcher import Launcher
from rlhf.feedback.store import FeedbackStore
from rlhf.labeling.queue import LabelingQueue
from rlhf.labeling.tasks import Judgment, TaskSpec, judgment_key

selenium = pytest.importorskip("selenium")
from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import WebDriverException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support import expected_conditions as ec  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
# The README's screenshots are refreshed with RLHF_UPDATE_SCREENSHOTS=1; otherwise a run (CI included) saves
# them beside its other temporary files and leaves the checkout clean.
DOCS_IMG = (
    Path(__file__).resolve().parents[2] / "docs" / "img"
    if os.environ.get("RLHF_UPDATE_SCREENSHOTS") == "1"
    else Path(tempfile.gettempdir()) / "rlhf-screenshots"
)
TOKENS = {"alice": "alice-token-7f3a", "bob": "bob-token-91c2", "maya": "maya-admin-token-5e0d"}
SCRIPT = '<script>document.title = "pwned"; window.__pwned = 1;</script><b>bold?</b>'

# Labeled before the server starts, by three simulated labelers (erin disagrees on most), so that the
# overview has agreement to show.
HISTORY = [
    ("Name a primary colour.", ["Red.", "Purple is a primary colour."]),
    ("What is 12 x 12?", ["144", "124"]),
    ("Translate 'merci' to English.", ["Thank you.", "Goodbye."]),
    ("Is the Pacific the largest ocean?", ["Yes, it is the largest.", "No, the Atlantic is larger."]),
    ("Give a synonym for 'rapid'.", ["Fast.", "Slow."]),
    ("How many legs does a spider have?", ["Eight.", "Six."]),
]
HISTORY_CHOICES = {"carol": [0, 0, 0, 0, 0, 0], "dave": [0, 0, 0, 1, 0, 0], "erin": [1, 1, 0, 1, 1, 1]}

QUEUE = [
    TaskSpec(
        "Explain in two sentences why the sky is blue.",
        [
            "Sunlight is scattered by the molecules in the air, and short blue wavelengths scatter much more "
            "than long red ones (Rayleigh scattering).\nSo blue light reaches our eyes from every direction "
            "of the sky.",
            "The sky reflects the colour of the oceans, which cover most of the Earth. That is why it looks "
            "blue on clear days.",
        ],
        redundancy=2,
    ),
    TaskSpec("Write a friendly one-line greeting for a README.", [SCRIPT, "Welcome! Glad you are here."]),
    TaskSpec(
        [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Capital of France?"}],
        ["Paris."],
    ),
    TaskSpec("Suggest a name for a cat.", ["Miso", "Cat"]),
    TaskSpec("List three prime numbers.", ["2, 3, 5", "4, 6, 8", "1, 9, 15"]),
]


def _options() -> webdriver.ChromeOptions:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        "--window-size=1360,900",
    ):
        options.add_argument(arg)
    return options


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    work = tmp_path_factory.mktemp("labeling")
    db = work / "feedback.db"
    url = f"sqlite:///{db}"
    tokens_file = work / "tokens.txt"
    tokens_file.write_text("# labeler token\n" + "".join(f"{who} {tok}\n" for who, tok in TOKENS.items()))
    with FeedbackStore(url) as store:
        queue = LabelingQueue(store, redundancy=3)
        queue.enqueue([TaskSpec(p, r) for p, r in HISTORY])
        for who, choices in HISTORY_CHOICES.items():
            for choice in choices:
                task = queue.next_task(who)
                queue.submit(Judgment(task.id, who, chosen_index=choice, score=5 + (choice == 0)))
        ids = LabelingQueue(store, redundancy=1).enqueue(QUEUE).ids
    with Launcher(work / "services") as launcher:
        proc = launcher.start(
            "feedback",
            ["serve", "feedback"],
            args=[
                "--database-url",
                url,
                "--labeling-port",
                "0",
                "--labeling-host",
                "127.0.0.1",
                "--labeling-tokens-file",
                str(tokens_file),
                "--labeling-admins",
                "maya",
                "--labeling-min-pairs",
                "3",
                "--labeling-low-agreement",
                "0.4",
            ],
            timeout=120,
        )
        ports = json.loads((launcher.workdir / "feedback.ports.json").read_text())
        yield {
            "base": f"http://127.0.0.1:{ports['labeling_port']}",
            "metrics": f"http://127.0.0.1:{proc.metrics_port}/metrics",
            "url": url,
            "task_ids": list(ids),
        }


@pytest.fixture(scope="module")
def browser():
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip("Chromium not installed (apt-get install chromium chromium-driver)")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=_options())
    yield driver
    driver.quit()


def wait(driver, condition, timeout=30):
    return WebDriverWait(driver, timeout).until(condition)


def navigate(driver, action) -> None:
    """Run ``action`` (a click or a key that loads a new page) and wait until the new page ran its scripts.

    The old page is marked with a window property; the new document has none. Errors while the browser is
    between documents are retried (Chromium can answer a query during navigation with an inspector error).
    """
    driver.execute_script("window.__rlhfOldPage = true")
    action()
    WebDriverWait(driver, 30, ignored_exceptions=(WebDriverException,)).until(
        lambda d: d.execute_script(
            "return window.__rlhfOldPage === undefined && document.readyState === 'complete'"
        )
    )


def sign_in(driver, base: str, token: str) -> None:
    driver.delete_all_cookies()
    driver.get(base + "/login")
    field = wait(driver, ec.presence_of_element_located((By.ID, "token")))
    field.send_keys(token)
    navigate(driver, driver.find_element(By.ID, "sign-in").click)


def flash_texts(driver) -> list[str]:
    return [e.text for e in driver.find_elements(By.CSS_SELECTOR, ".flash")]


def shown_task_id(driver) -> str:
    form = wait(driver, ec.presence_of_element_located((By.ID, "judgment")))
    return form.get_attribute("action").rsplit("/", 1)[1]


def submit_and_wait(driver, action) -> None:
    navigate(driver, action)


def press(driver, key: str) -> None:
    driver.find_element(By.TAG_NAME, "body").send_keys(key)


def test_a_wrong_token_is_refused(service, browser):
    sign_in(browser, service["base"], "not-a-token")
    error = wait(browser, ec.presence_of_element_located((By.ID, "login-error")))
    assert error.text == "Unknown token."
    browser.get(service["base"] + "/label")
    assert browser.current_url.endswith("/login")
    assert not browser.find_elements(By.ID, "judgment")


def test_a_labeler_labels_with_clicks_and_keys_and_each_judgment_is_stored_once(service, browser):
    base, ids = service["base"], service["task_ids"]
    sign_in(browser, base, TOKENS["alice"])
    assert wait(browser, ec.presence_of_element_located((By.ID, "whoami"))).text == "alice"

    # Task 1, with the mouse: pick response A, rate it 6, write a reason (its "s" must not skip), submit.
    assert shown_task_id(browser) == ids[0]
    assert browser.find_element(By.ID, "left-for-you").text == "5"
    texts = [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".response-text")]
    assert texts[0].startswith("Sunlight is scattered") and "\n" in texts[0]  # newlines kept
    browser.find_element(By.ID, "card-0").click()
    browser.find_element(By.CSS_SELECTOR, "label:has(#score-6)").click()
    browser.find_element(By.ID, "reason").send_keys("Correct physics; the second is a myth.")
    DOCS_IMG.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(DOCS_IMG / "labeling-page.png"))
    submit_and_wait(browser, browser.find_element(By.ID, "submit").click)
    assert "Saved." in flash_texts(browser)
    assert browser.find_element(By.ID, "done-today").text == "1"

    # Task 2 holds a <script>: it is shown as text and never runs. Keyboard: "2" then Enter.
    assert shown_task_id(browser) == ids[1]
    assert browser.find_element(By.ID, "response-0").text == SCRIPT
    assert browser.find_elements(By.CSS_SELECTOR, "#response-0 script, #response-0 b") == []
    assert browser.execute_script("return window.__pwned === undefined") is True
    assert browser.title != "pwned"
    press(browser, "2")
    assert browser.find_element(By.ID, "choice-1").is_selected()
    submit_and_wait(browser, lambda: press(browser, Keys.ENTER))
    assert "Saved." in flash_texts(browser)

    # Task 3 is one response to rate (a chat prompt): "5" sets the score; typing a reason ("S" in it must not
    # skip), Ctrl+Enter submits from the text box.
    assert shown_task_id(browser) == ids[2]
    roles = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#prompt .role")]
    assert roles == ["SYSTEM", "USER"]
    press(browser, "5")
    assert browser.find_element(By.ID, "score-5").is_selected()
    reason = browser.find_element(By.ID, "reason")
    reason.send_keys("Short and right.")
    submit_and_wait(browser, lambda: reason.send_keys(Keys.CONTROL, Keys.ENTER))

    # Task 4: S skips it.
    assert shown_task_id(browser) == ids[3]
    submit_and_wait(browser, lambda: press(browser, "s"))
    assert "Skipped." in flash_texts(browser)

    # Task 5 (three responses): a double post of the same form (two requests at once, as a double click
    # without JavaScript would send), then a reload: one judgment.
    assert shown_task_id(browser) == ids[4]
    browser.find_element(By.ID, "card-0").click()
    statuses = browser.execute_async_script(
        """
        const done = arguments[arguments.length - 1];
        const form = document.getElementById("judgment");
        const post = () => fetch(form.action, {method: "POST", body: new FormData(form)}).then(r => r.status);
        Promise.all([post(), post()]).then(done);
        """
    )
    assert statuses == [200, 200]
    navigate(browser, browser.refresh)
    assert wait(browser, ec.presence_of_element_located((By.ID, "empty")))
    assert browser.find_element(By.ID, "done-today").text == "4"
    assert browser.find_element(By.ID, "left-for-you").text == "0"

    with FeedbackStore(service["url"], migrate=False) as store:
        mine = list(store.export(kinds=["comparison", "rating"], labeler_ids=["alice"]))
    comparisons = {
        r.comparison.metadata["labeling_task_id"]: r.comparison for r in mine if r.HasField("comparison")
    }
    ratings = {r.rating.metadata["labeling_task_id"]: r.rating for r in mine if r.HasField("rating")}
    assert len(mine) == len(comparisons) + len(ratings)  # nothing twice
    assert sorted(comparisons) == sorted([ids[0], ids[1], ids[4]])
    assert sorted(ratings) == sorted([ids[0], ids[2]])
    assert comparisons[ids[0]].chosen_index == 0
    assert comparisons[ids[0]].reason == "Correct physics; the second is a myth."
    assert ratings[ids[0]].score == 6 and ratings[ids[0]].response.text.startswith("Sunlight")
    assert comparisons[ids[1]].chosen_index == 1
    assert comparisons[ids[1]].responses[0].text == SCRIPT  # stored as sent
    assert ratings[ids[2]].score == 5 and ratings[ids[2]].reason == "Short and right."
    assert comparisons[ids[4]].chosen_index == 0
    assert all(c.idempotency_key == judgment_key(t, "alice") for t, c in comparisons.items())

    metrics = urllib.request.urlopen(service["metrics"], timeout=30).read().decode()
    assert "rlhf_labeling_judgments_total 4.0" in metrics
    assert "rlhf_labeling_judgment_seconds_count 4.0" in metrics
    assert "rlhf_labeling_queue_depth 2.0" in metrics  # task 1 wants a 2nd judgment, the skipped task 1


def test_a_labeler_who_is_not_an_admin_cannot_open_the_overview(service, browser):
    sign_in(browser, service["base"], TOKENS["bob"])
    wait(browser, ec.presence_of_element_located((By.ID, "whoami")))
    assert not browser.find_elements(By.LINK_TEXT, "Overview")
    browser.get(service["base"] + "/overview")
    assert "403" in browser.title or "Forbidden" in browser.page_source


def test_the_overview_shows_judgments_agreement_and_exports(service, browser):
    sign_in(browser, service["base"], TOKENS["maya"])
    browser.get(service["base"] + "/overview")
    table = wait(browser, ec.presence_of_element_located((By.ID, "labelers")))
    rows = {
        r.get_attribute("data-labeler"): [c.text for c in r.find_elements(By.TAG_NAME, "td")]
        for r in table.find_elements(By.CSS_SELECTOR, "tbody tr[data-labeler]")
    }
    assert rows["carol"][1] == "6" and rows["erin"][1] == "6"
    # carol-dave agree on 5 of 6 tasks, carol-erin on 1, dave-erin on 2: erin agrees on 3 of 12 pairs.
    assert rows["erin"][4] == "25%" and rows["carol"][4] == "50%"
    assert "erin" in browser.find_element(By.ID, "low-agreement").text
    assert "carol" not in browser.find_element(By.ID, "low-agreement").text
    browser.save_screenshot(str(DOCS_IMG / "labeling-overview.png"))
    exported = browser.execute_async_script(
        """
        const done = arguments[arguments.length - 1];
        fetch(document.getElementById("export").href).then(r => r.text()).then(done);
        """
    )
    lines = [json.loads(line) for line in exported.splitlines()]
    assert len(lines) >= 18 + 3
    assert all(line["metadata"]["labeling_task_id"].startswith("task_") for line in lines)
