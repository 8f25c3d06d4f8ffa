"""The dashboard in a real browser: Debian's chromium driven by selenium, against `nclab serve`
with real experiments. Screenshots of each page (1280x800) go to a temporary folder that
the run prints."""

import shutil
from pathlib import Path

import httpx
import pytest

from tests.conftest import make_processes, running
from tests.support import ENDLESS, free_port, wait_for_status, wait_ready

pytestmark = pytest.mark.browser

pytest.importorskip("selenium", reason="selenium is not installed (pip install -e '.[test]')")
from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import NoAlertPresentException, WebDriverException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
if not (CHROMIUM and CHROMEDRIVER):
    pytest.skip("Debian's chromium and chromium-driver are not installed (.ci/run installs them)",
                allow_module_level=True)

# A page that follows a job's status reloads itself: an element read as it goes is stale, and read again.
# Between finding an element and reading it, Chrome may instead answer that the node "does not belong to the
# document", an unknown error. WebDriverException covers both (a stale element is one): a wait that ignores it
# can turn a failure into a timeout, never a pass.
RELOADING = (WebDriverException,)
HOSTILE_NAME = "<script>alert('name')</script>"
HOSTILE_TAG = "<img src=x onerror=alert('tag')>"


def browser(width: int = 1280, height: int = 800) -> webdriver.Chrome:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     f"--window-size={width},{height}"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    return driver


@pytest.fixture(scope="module")
def lab(own_embedded) -> dict:
    """`nclab serve` holding 16 finished UFM solves (K = 3, 4, 5, 6; two with hostile labels),
    a finished sweep, and one endless solve left running: alone on a database of their own,
    so that what the pages count is what this made."""
    client = own_embedded.client
    ids = []
    for i in range(16):
        spec = {"kind": "ufm", "K": 3 + i % 4, "d": 6, "n_per_class": 2, "seed": i,
                "normalization": "normalized" if i % 2 else "regularized"}
        body = {"spec": spec, "name": HOSTILE_NAME if i < 2 else f"solve {i}",
                "tags": {"probe": HOSTILE_TAG} if i < 2 else {"batch": "ui"}}
        ids.append(client.post("/experiments", json=body).json()["id"])
    sweep = client.post("/sweeps", json={
        "name": "ui sweep", "base": {"kind": "ufm", "K": 4, "d": 6, "n_per_class": 2},
        "variants": [{"normalization": "normalized", "logit_scale": 5}, {"normalization": "regularized"}],
        "grid": {"seed": [0, 1]}}).json()
    for experiment_id in ids + sweep["members"]:
        wait_for_status(client, experiment_id, {"succeeded"}, timeout=120)
    endless = client.post("/experiments", json={"spec": ENDLESS, "name": "endless"}).json()["id"]
    wait_for_status(client, endless, {"running"}, timeout=60)
    return {"url": own_embedded.base_url, "sweep": sweep["id"], "endless": endless, "first": ids[0]}


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ui-screenshots")
    print(f"dashboard screenshots in {folder}")
    return folder


@pytest.fixture
def driver():
    driver = browser()
    yield driver
    driver.quit()


def images_loaded(driver) -> list[str]:
    """The sources of the page's images that did not load (naturalWidth 0), once every one is complete."""
    WebDriverWait(driver, 60).until(lambda d: d.execute_script(
        "return [...document.images].every(image => image.complete)"))
    return driver.execute_script("return [...document.images].filter(i => i.naturalWidth === 0).map(i => i.src)")


def column(driver, heading: str) -> list[str]:
    index = [th.text.split(" ")[0] for th in driver.find_elements(By.CSS_SELECTOR, "#experiments thead th")].index(
        heading)
    return [row.find_elements(By.TAG_NAME, "td")[index].text
            for row in driver.find_elements(By.CSS_SELECTOR, "#experiments tbody tr")]


def no_alert(driver) -> bool:
    try:
        driver.switch_to.alert
    except NoAlertPresentException:
        return True
    return False


def test_experiments_filter_sort_page_and_hostile_text(lab, driver, screenshots):
    driver.get(lab["url"] + "/")
    assert driver.current_url.endswith("/ui")
    rows = driver.find_elements(By.CSS_SELECTOR, "#experiments tbody tr")
    assert len(rows) == 21  # 16 solves, 4 sweep members, the endless one: one page of 50
    driver.save_screenshot(str(screenshots / "experiments.png"))

    # User text is text: the name and the tag show as written, and nothing ran.
    hostile = [row for row in rows if HOSTILE_NAME in row.text]
    assert len(hostile) == 2 and all(f"probe={HOSTILE_TAG}" in row.text for row in hostile)
    assert driver.execute_script("return document.querySelectorAll('#experiments script, #experiments img').length") \
        == 0
    assert no_alert(driver)

    where = driver.find_element(By.ID, "where")
    where.send_keys("spec.K = 5 and kind = 'ufm'")
    submit_and_wait(driver, where)
    assert column(driver, "K") == ["5"] * 4
    assert "where=spec.K" in driver.find_element(By.ID, "csv").get_attribute("href")

    driver.get(lab["url"] + "/ui?where=" + "sweep%20is%20null%20and%20name%20!%3D%20'endless'")
    driver.find_element(By.CSS_SELECTOR, "a.sort[data-field='spec.K']").click()
    ascending = [int(k) for k in column(driver, "K")]
    assert ascending == sorted(ascending) and len(ascending) == 16
    driver.find_element(By.CSS_SELECTOR, "a.sort[data-field='spec.K']").click()
    descending = [int(k) for k in column(driver, "K")]
    assert descending == sorted(ascending, reverse=True) and "order_by=-spec.K" in driver.current_url

    driver.get(lab["url"] + "/ui?limit=15&order_by=created_at")
    first_page = [row.get_attribute("data-id") for row in driver.find_elements(By.CSS_SELECTOR, "tbody tr")]
    driver.find_element(By.ID, "next-page").click()
    second_page = [row.get_attribute("data-id") for row in driver.find_elements(By.CSS_SELECTOR, "tbody tr")]
    assert len(first_page) == 15 and len(second_page) == 6 and not set(first_page) & set(second_page)
    assert not driver.find_elements(By.ID, "next-page")

    driver.get(lab["url"] + "/ui?where=spec.K%20%3D")
    assert "incomplete" in driver.find_element(By.ID, "error").text


def test_an_experiment_page_shows_its_documents_history_and_charts(lab, driver, screenshots):
    driver.get(lab["url"] + "/ui")
    driver.find_element(By.CSS_SELECTOR, f"tr[data-id='{lab['first']}'] a.id").click()
    assert driver.find_element(By.ID, "experiment-id").text == lab["first"]
    assert driver.find_element(By.TAG_NAME, "h1").text == HOSTILE_NAME
    assert '"kind": "ufm"' in driver.find_element(By.ID, "spec").text
    assert '"converged": true' in driver.find_element(By.ID, "result").text
    assert len(driver.find_elements(By.CSS_SELECTOR, "#history tbody tr")) >= 2
    assert len(driver.find_elements(By.CSS_SELECTOR, ".charts img")) == 5
    assert images_loaded(driver) == []
    assert no_alert(driver)
    driver.save_screenshot(str(screenshots / "experiment.png"))


def test_cancel_stops_a_running_experiment(lab, driver, screenshots):
    driver.get(f"{lab['url']}/ui/experiments/{lab['endless']}")
    assert driver.find_element(By.ID, "status").text.startswith("running")
    driver.save_screenshot(str(screenshots / "experiment-running.png"))
    driver.find_element(By.ID, "cancel").click()
    # The page follows the status and reloads once the worker has stopped.
    WebDriverWait(driver, 60, ignored_exceptions=RELOADING).until(
        lambda d: d.find_element(By.ID, "status").text == "canceled")
    assert not driver.find_elements(By.ID, "cancel")


def test_a_comparison_is_three_clicks_from_the_front_page(lab, driver, screenshots):
    driver.get(lab["url"] + "/")
    driver.find_element(By.ID, "nav-compare").click()  # one click: grouped by normalization, nc1
    groups = [row.find_elements(By.TAG_NAME, "td")[0].text
              for row in driver.find_elements(By.CSS_SELECTOR, "#aggregate tbody tr")]
    assert groups == ["normalized", "regularized"]
    assert images_loaded(driver) == []
    assert driver.find_element(By.ID, "curves").get_attribute("naturalWidth") == "900"
    driver.save_screenshot(str(screenshots / "compare.png"))

    metric = driver.find_element(By.ID, "metric")
    metric.clear()
    metric.send_keys("no_such_metric")
    submit_and_wait(driver, metric)
    assert "unknown metric" in driver.find_element(By.ID, "error").text


def test_sweeps_list_a_sweep_and_compare_its_arms(lab, driver, screenshots):
    driver.get(lab["url"] + "/ui/sweeps")
    driver.save_screenshot(str(screenshots / "sweeps.png"))
    driver.find_element(By.CSS_SELECTOR, f"a[href='/ui/sweeps/{lab['sweep']}']").click()
    assert "4 succeeded" in driver.find_element(By.ID, "counts").text
    assert len(driver.find_elements(By.CSS_SELECTOR, "#members tbody tr")) == 4
    assert images_loaded(driver) == []
    driver.save_screenshot(str(screenshots / "sweep.png"))
    driver.find_element(By.ID, "compare-link").click()
    assert driver.find_element(By.ID, "group-by").get_attribute("value") == "spec.normalization,spec.logit_scale"
    assert len(driver.find_elements(By.CSS_SELECTOR, "#aggregate tbody tr")) == 2
    assert images_loaded(driver) == []


def test_a_phone_width_window_scrolls_the_table_not_the_page(lab, screenshots):
    driver = browser(390, 844)
    try:
        for page in ("/ui", f"/ui/experiments/{lab['first']}", "/ui/compare"):
            driver.get(lab["url"] + page)
            overflow = driver.execute_script(
                "return document.documentElement.scrollWidth - document.documentElement.clientWidth")
            assert overflow <= 1, page
        driver.save_screenshot(str(screenshots / "compare-phone.png"))
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def keyed_lab(tmp_path_factory) -> dict:
    """`nclab serve` with the keys of a member ada (who owns an experiment that succeeded), a member bob and
    a reader wall; no other work yet."""
    with running(make_processes(tmp_path_factory.mktemp("keyed"))) as processes:
        processes.env["NCLAB_API_KEYS"] = "ada:ada-key, bob:bob-key, wall:wall-key:reader"
        port = free_port()
        serve = processes.start("serve", "--port", str(port), name="serve")
        base_url = f"http://127.0.0.1:{port}"
        wait_ready(base_url, serve)
        with httpx.Client(base_url=base_url, timeout=30, headers={"Authorization": "Bearer ada-key"}) as client:
            finished = client.post("/experiments", json={"kind": "ufm", "K": 3, "d": 4, "n_per_class": 2}).json()["id"]
            wait_for_status(client, finished, {"succeeded"}, timeout=60)
            yield {"url": base_url, "ada": client, "finished": finished}


def test_with_keys_the_dashboard_asks_for_one_and_keeps_it_in_a_cookie(keyed_lab):
    base_url, experiment_id = keyed_lab["url"], keyed_lab["finished"]
    driver = browser()
    try:
        driver.get(f"{base_url}/ui/experiments/{experiment_id}")
        assert "/ui/login" in driver.current_url
        key = driver.find_element(By.ID, "key")
        key.send_keys("wrong")
        submit_and_wait(driver, key)
        assert driver.find_element(By.ID, "error").text == "unknown API key"
        key = driver.find_element(By.ID, "key")
        key.send_keys("ada-key")
        submit_and_wait(driver, key)
        assert driver.find_element(By.ID, "experiment-id").text == experiment_id  # back where it started
        assert images_loaded(driver) == []  # the plots came with the cookie
        cookie = driver.get_cookie("nclab_api_key")
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    finally:
        driver.quit()


def submit_and_wait(driver, field) -> None:
    """Submit the field's form and wait for the page it loads: WebElement.submit is a script, which returns
    before the new document is there, and a find_element right after it could meet the old page."""
    old_page = driver.find_element(By.TAG_NAME, "html")
    field.submit()
    WebDriverWait(driver, 30).until(expected_conditions.staleness_of(old_page))
    WebDriverWait(driver, 30, ignored_exceptions=RELOADING).until(
        lambda d: d.execute_script("return document.readyState") == "complete"
    )


def sign_in(driver, base_url: str, key: str, page: str) -> None:
    """A fresh sign-in with ``key``, landing on ``page``."""
    driver.delete_all_cookies()
    driver.get(f"{base_url}/ui/login?next={page}")
    field = driver.find_element(By.ID, "key")
    field.send_keys(key)
    submit_and_wait(driver, field)
    WebDriverWait(driver, 30, ignored_exceptions=RELOADING).until(
        lambda d: d.current_url.endswith(page) and d.find_element(By.ID, "signed-in")
    )


def post_from_the_page(driver, path: str) -> int:
    """The status of a form POST sent by the page's own script (as a crafted form would be), with its cookie."""
    return driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "fetch(arguments[0], {method: 'POST', body: new URLSearchParams({name: 'taken'}), redirect: 'manual'})"
        ".then(r => done(r.status));", path)


def edit_labels(driver, name: str, tags: str) -> None:
    field = driver.find_element(By.ID, "rename")
    field.clear()
    field.send_keys(name)
    editor = driver.find_element(By.ID, "tags-editor")
    editor.clear()
    editor.send_keys(tags)
    driver.find_element(By.ID, "save-labels").click()


def tags_shown(driver) -> list[str]:
    return [tag.text for tag in driver.find_elements(By.CSS_SELECTOR, "#tags .tag")]


def test_a_reader_sees_no_cancel_or_labels_and_a_member_only_on_its_own_work(keyed_lab, screenshots):
    base_url, ada = keyed_lab["url"], keyed_lab["ada"]
    adas = ada.post("/experiments", json={"spec": ENDLESS, "name": "ada's"}).json()["id"]
    # Running before the others are submitted: which of several queued jobs takes the one slot first is the
    # scheduler's to decide (tests/test_scheduler.py), not this test's.
    wait_for_status(ada, adas, {"running"}, timeout=60)
    bobs = ada.post("/experiments", json={"spec": ENDLESS, "name": "bob's", "tags": {"old": "1"}},
                    headers={"Authorization": "Bearer bob-key"}).json()["id"]
    sweep = ada.post("/sweeps", json={"name": "ada's sweep", "base": ENDLESS, "grid": {"seed": [1, 2]}}).json()
    driver = browser()
    driver.set_script_timeout(30)
    try:
        sign_in(driver, base_url, "wall-key", f"/ui/experiments/{adas}")
        assert driver.find_element(By.ID, "signed-in").text == "wall (reader)"
        assert driver.find_element(By.ID, "status").text.startswith("running")
        assert not driver.find_elements(By.ID, "cancel") and not driver.find_elements(By.ID, "labels-form")
        driver.save_screenshot(str(screenshots / "experiment-reader.png"))
        assert post_from_the_page(driver, f"/ui/experiments/{adas}/cancel") == 403
        assert post_from_the_page(driver, f"/ui/experiments/{adas}/labels") == 403
        driver.get(f"{base_url}/ui/sweeps/{sweep['id']}")
        assert not driver.find_elements(By.ID, "cancel-sweep") and not driver.find_elements(By.ID, "labels-form")
        assert post_from_the_page(driver, f"/ui/sweeps/{sweep['id']}/cancel") == 403
        assert post_from_the_page(driver, f"/ui/sweeps/{sweep['id']}/labels") == 403

        sign_in(driver, base_url, "bob-key", f"/ui/experiments/{adas}")
        assert driver.find_element(By.ID, "signed-in").text == "bob (member)"
        assert not driver.find_elements(By.ID, "cancel") and not driver.find_elements(By.ID, "labels-form")
        assert post_from_the_page(driver, f"/ui/experiments/{adas}/cancel") == 403
        driver.get(f"{base_url}/ui/experiments/{bobs}")  # bob's own, queued behind ada's
        edit_labels(driver, "bob's, renamed", "fig=2\n\nbad key=3")
        assert WebDriverWait(driver, 30, ignored_exceptions=RELOADING).until(
            lambda d: d.find_element(By.ID, "labels-error").text).startswith("tags.bad key")
        assert tags_shown(driver) == ["old=1"]  # the refused labels changed nothing
        edit_labels(driver, "bob's, renamed", "fig=2\nrun = second ")
        WebDriverWait(driver, 30, ignored_exceptions=RELOADING).until(
            lambda d: d.find_element(By.TAG_NAME, "h1").text == "bob's, renamed")
        assert tags_shown(driver) == ["fig=2", "run=second"]  # old=1 was left out, so removed
        driver.find_element(By.ID, "cancel").click()
        WebDriverWait(driver, 30, ignored_exceptions=RELOADING).until(
            lambda d: d.find_element(By.ID, "status").text == "canceled")
        driver.get(f"{base_url}/ui/sweeps/{sweep['id']}")
        assert not driver.find_elements(By.ID, "cancel-sweep") and not driver.find_elements(By.ID, "labels-form")

        sign_in(driver, base_url, "ada-key", f"/ui/sweeps/{sweep['id']}")
        edit_labels(driver, "ada's sweep", "paper=fig3")
        WebDriverWait(driver, 30, ignored_exceptions=RELOADING).until(lambda d: tags_shown(d) == ["paper=fig3"])
        driver.find_element(By.ID, "cancel-sweep").click()
        WebDriverWait(driver, 30, ignored_exceptions=RELOADING).until(
            lambda d: "2 canceled" in d.find_element(By.ID, "counts").text)
        assert not driver.find_elements(By.ID, "cancel-sweep")
        driver.get(f"{base_url}/ui/experiments/{adas}")
        driver.find_element(By.ID, "cancel").click()
        WebDriverWait(driver, 60, ignored_exceptions=RELOADING).until(
            lambda d: d.find_element(By.ID, "status").text == "canceled")
    finally:
        driver.quit()
    # The reader's and bob's POSTs changed nothing: ada's run was stopped by ada, and kept its name; her
    # sweep's members took its tags.
    assert ada.get(f"/experiments/{adas}").json()["name"] == "ada's"
    assert ada.get(f"/experiments/{bobs}").json()["tags"] == {"fig": "2", "run": "second"}
    assert [ada.get(f"/experiments/{m}").json()["tags"] for m in sweep["members"]] == [{"paper": "fig3"}] * 2
