"""The web page in a real browser: headless Chromium (Debian's chromium and chromium-driver, driven
by selenium) opens the server's page, types a prompt, presses Generate, waits for the picture, and
the picture is a PNG with the prompt in its metadata; its download link and "reuse settings" work."""

import base64
import io
import shutil
import tempfile

import pytest
from PIL import Image

from ldm.png_settings import settings_from_chunks
from serve_helpers import make_server, running

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed: pip install -e '.[test]'")
if not (CHROMIUM and DRIVER):
    pytest.skip("headless Chromium is not installed: apt-get install chromium chromium-driver (.ci/run does)",
                allow_module_level=True)

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-quic", "--disable-dev-shm-usage",
         "--window-size=1280,900"]


@pytest.fixture
def browser():
    options = webdriver.ChromeOptions()
    profile = tempfile.mkdtemp(prefix="ldm-chromium-")
    for flag in [*FLAGS, f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    options.binary_location = CHROMIUM
    # the driver is given explicitly, so selenium never looks for one online
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=DRIVER))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def test_page_generates_a_png_with_the_prompt_in_its_metadata(browser):
    prompt = "a large red circle in the center, on a white background"
    with running(make_server(max_batch=4)) as url:
        browser.get(url + "/")
        wait = WebDriverWait(browser, 90)
        wait.until(lambda d: d.find_element(By.ID, "sampler").get_attribute("value"))  # samplers and options loaded
        assert browser.find_element(By.ID, "width").get_attribute("value") == "32"  # the model's defaults
        browser.find_element(By.ID, "prompt").send_keys(prompt)
        seed = browser.find_element(By.ID, "seed")
        seed.clear()
        seed.send_keys("42")
        browser.find_element(By.ID, "generate").click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "img.result"))
        img = browser.find_element(By.CSS_SELECTOR, "img.result")
        link = browser.find_element(By.CSS_SELECTOR, "a.download")
        assert browser.find_element(By.ID, "error").get_attribute("hidden") is not None  # no error shown
        src = img.get_attribute("src")
        assert src.startswith("data:image/png;base64,") and link.get_attribute("href") == src
        assert link.get_attribute("download") == "ldm-42.png"
        png = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        assert png.format == "PNG" and png.size == (32, 32)
        recorded = settings_from_chunks(png.text).options
        assert recorded.prompt == prompt and recorded.seed == 42 and prompt in png.text["parameters"]
        # clicking the picture puts its settings back into the form
        browser.find_element(By.ID, "prompt").clear()
        seed.clear()
        img.click()
        assert browser.find_element(By.ID, "prompt").get_attribute("value") == prompt
        assert browser.find_element(By.ID, "seed").get_attribute("value") == "42"
        assert prompt in browser.find_element(By.CSS_SELECTOR, ".card .settings").text
