"""``latentgen serve`` driven in headless Chromium (Debian's chromium + chromium-driver).

One server and one browser for the whole module, on a tiny untrained pipeline (class label +
segmentation map, a 4x4-code trained window), so that the page is what a user gets: the
generate tab, the paint canvas, uploads, errors in the page, cancel, the tokenizer tab. The
screenshots are kept in ``$LATENTGEN_TEST_ARTIFACTS`` (CI sets it) or the test's temp folder.
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from latentgen import Pipeline

pytest.importorskip("gradio", reason="the `ui` extra (gradio) is not installed")
pytest.importorskip("selenium", reason="selenium (the `dev` extra) is not installed")

from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

# Gradio's queue calls pandas options that pandas 3 deprecates; not ours to fix.
pytestmark = pytest.mark.filterwarnings(
    "ignore:'future.no_silent_downcasting':DeprecationWarning",
    "ignore:The copy keyword is deprecated:DeprecationWarning",
)

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
DRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
if not (os.path.exists(CHROMIUM) and os.path.exists(DRIVER)):
    if os.environ.get("LATENTGEN_REQUIRE_BROWSER") == "1":  # CI: .ci/run installed them
        raise RuntimeError(
            f"LATENTGEN_REQUIRE_BROWSER=1 but {CHROMIUM} or {DRIVER} is missing: apt-get install "
            "chromium chromium-driver"
        )
    pytest.skip(
        "needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)",
        allow_module_level=True,
    )

SPEC = {
    "tokenizer": {"type": "toy.palette", "vocab_size": 8, "downsample": 4},
    "prior": {
        "type": "transformer",
        "vocab_size": 8,
        "block_size": 16,
        "n_layer": 1,
        "n_head": 2,
        "n_embd": 16,
        "conditions": {"label": {"vocab_size": 3}, "seg": {"vocab_size": 4, "num_tokens": 16}},
    },
    "conditioners": {
        "label": {
            "type": "class_label",
            "num_classes": 3,
            "class_names": ["circle", "square", "triangle"],
        },
        "seg": {"type": "segmentation", "num_classes": 4, "downsample": 4},
    },
}
MAX_PIXELS = 300_000  # a 1024x1024 request is refused in the page
WAIT = int(
    os.environ.get("LATENTGEN_SERVE_WAIT", "120")
)  # seconds, generous for a loaded CI machine


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    where = os.environ.get("LATENTGEN_TEST_ARTIFACTS")
    path = Path(where) if where else tmp_path_factory.mktemp("artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from latentgen.serve.app import launch
    from latentgen.serve.session import Studio

    root = tmp_path_factory.mktemp("serve")
    torch.manual_seed(0)
    pipe = Pipeline.from_spec(SPEC)
    pipe.card["image_size"] = 16
    pipe.save_pretrained(root / "pipe")
    studio = Studio(root / "pipe", root / "out", max_pixels=MAX_PIXELS)
    port = _free_port()
    page = launch(studio, port=port, block=False)
    yield {"url": f"http://127.0.0.1:{port}/", "studio": studio, "root": root}
    page.close()


@pytest.fixture(scope="module")
def browser():
    opts = Options()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        opts.add_argument(arg)
    opts.add_argument("--window-size=1400,1300")
    driver = webdriver.Chrome(options=opts, service=Service(DRIVER))
    yield driver
    driver.quit()


@pytest.fixture
def page(server, browser):
    browser.get(server["url"])
    WebDriverWait(browser, WAIT).until(lambda d: d.find_elements(By.ID, "lg-generate"))
    return browser


# -- helpers ----------------------------------------------------------------------------------
def _css(d, selector):
    return d.find_element(By.CSS_SELECTOR, selector)


def _set_number(d, elem_id, value):
    box = _css(d, f"#{elem_id} input")
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(str(value), Keys.TAB)


def _choose(d, elem_id, text):
    _css(d, f"#{elem_id} input").click()
    option = f"#{elem_id} li[role=option][aria-label='{text}']"
    WebDriverWait(d, WAIT).until(lambda d: d.find_elements(By.CSS_SELECTOR, option))
    _css(d, option).click()
    WebDriverWait(d, WAIT).until(
        lambda d: _css(d, f"#{elem_id} input").get_attribute("value") == text
    )


def _upload(d, elem_id, path):
    _css(d, f"#{elem_id} input[type=file]").send_keys(str(path))
    # The file row shows the name (stem and suffix on separate lines) and, once uploaded, its size.
    WebDriverWait(d, WAIT).until(
        lambda d: (
            Path(path).stem in _css(d, f"#{elem_id}").text and "⇣" in _css(d, f"#{elem_id}").text
        )
    )


def _status(d):
    return _css(d, "#lg-status").text


def _generate(d, expect=("Done", "Error")):
    before = _status(d)
    _css(d, "#lg-generate").click()

    def settled(d):
        text = _status(d)
        return text != before and any(text.startswith(e) for e in expect) and text

    try:
        return WebDriverWait(d, WAIT).until(settled)
    except TimeoutException:
        raise AssertionError(f"the page never said {expect}; status: {_status(d)!r}") from None


def _gallery_images(d):
    srcs = [img.get_attribute("src") for img in d.find_elements(By.CSS_SELECTOR, "#lg-gallery img")]
    return [Image.open(io.BytesIO(urllib.request.urlopen(s).read())) for s in dict.fromkeys(srcs)]


def _last_run(server):
    runs = sorted((server["root"] / "out").glob("run-*"))
    return runs[-1] if runs else None


# -- tests ------------------------------------------------------------------------------------
def test_choose_a_class_and_generate_beyond_the_trained_window(
    page, server, artifacts, tmp_path, monkeypatch
):
    _choose(page, "lg-cond-label", "2: triangle")
    _set_number(page, "lg-height", 24)
    _set_number(page, "lg-width", 32)  # the trained window is 16x16 px: sliding window
    _set_number(page, "lg-num", 2)
    _set_number(page, "lg-seed", 5)
    status = _generate(page)
    assert status.startswith("Done"), status
    images = _gallery_images(page)
    assert len(images) == 2
    assert all(im.size == (32, 24) for im in images), [im.size for im in images]
    page.save_screenshot(str(artifacts / "serve-generate.png"))

    run = _last_run(server)
    command = _css(page, "#lg-command textarea").get_attribute("value")
    assert "-c label=2" in command and "--size 24x32" in command and "--seed 5" in command
    assert command == (run / "command.txt").read_text().strip()
    codes = np.load(run / "codes.npy", allow_pickle=False)
    assert codes.shape == (2, 6, 8)

    # The printed command line draws the same images.
    import shlex

    from latentgen.cli import main

    args = shlex.split(command)[1:]
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert np.array_equal(
        np.asarray(Image.open(tmp_path / "samples.png")),
        np.asarray(Image.open(run / "samples.png")),
    )


def test_paint_a_segmentation_map_and_generate(page, server):
    canvas = page.find_element(By.ID, "lg-cond-seg-canvas")
    canvas.find_element(By.CSS_SELECTOR, "button[aria-label=Brush]").click()
    surface = canvas.find_elements(By.TAG_NAME, "canvas")[-1]
    chain = ActionChains(page).move_to_element_with_offset(surface, -60, -60).click_and_hold()
    for _ in range(12):
        chain = chain.move_by_offset(10, 10)
    chain.release().perform()
    status = _generate(page)
    assert status.startswith("Done"), status
    ids = np.asarray(Image.open(_last_run(server) / "cond-seg.png"))
    assert ids.shape == (16, 16)
    assert set(np.unique(ids)) == {0, 1}, "the stroke is class 1 (the brush's colour), the rest 0"


def test_upload_a_segmentation_map(page, server, tmp_path):
    ids = np.zeros((16, 16), np.uint8)
    ids[4:12, 2:14] = 3
    path = tmp_path / "map.png"
    Image.fromarray(ids, mode="L").save(path)
    _upload(page, "lg-cond-seg-file", path)
    status = _generate(page)
    assert status.startswith("Done"), status
    assert np.array_equal(np.asarray(Image.open(_last_run(server) / "cond-seg.png")), ids)


def test_bad_input_shows_the_library_error_and_the_server_keeps_serving(page, server, tmp_path):
    runs = len(list((server["root"] / "out").glob("run-*")))
    notes = tmp_path / "notes.png"
    notes.write_text("this is not an image")
    _upload(page, "lg-cond-seg-file", notes)
    status = _generate(page)
    assert status.startswith("Error") and "cannot read image" in status, status

    colours = np.zeros((16, 16, 3), np.uint8)
    colours[:8] = (1, 2, 3)  # not a palette colour
    wrong = tmp_path / "colours.png"
    Image.fromarray(colours).save(wrong)
    page.refresh()
    WebDriverWait(page, WAIT).until(lambda d: d.find_elements(By.ID, "lg-generate"))
    _upload(page, "lg-cond-seg-file", wrong)
    status = _generate(page)
    assert "not in the class palette (#010203)" in status, status

    small = tmp_path / "small.png"
    Image.fromarray(np.zeros((8, 8), np.uint8), mode="L").save(small)
    page.refresh()
    WebDriverWait(page, WAIT).until(lambda d: d.find_elements(By.ID, "lg-generate"))
    _upload(page, "lg-cond-seg-file", small)
    status = _generate(page)
    assert "segmentation map is 8x8 pixels but the requested image is 16x16" in status, status

    page.refresh()
    WebDriverWait(page, WAIT).until(lambda d: d.find_elements(By.ID, "lg-generate"))
    _set_number(page, "lg-height", 1024)
    _set_number(page, "lg-width", 1024)
    status = _generate(page)
    assert "above this server's limit of 300,000" in status, status
    assert len(list((server["root"] / "out").glob("run-*"))) == runs, "no run was written"

    _set_number(page, "lg-height", 16)
    _set_number(page, "lg-width", 16)
    assert _generate(page).startswith("Done"), "the server still serves"


def test_progress_and_cancel(page, server):
    runs = len(list((server["root"] / "out").glob("run-*")))
    _set_number(page, "lg-height", 512)
    _set_number(page, "lg-width", 512)  # 128x128 codes: seconds even on a fast machine
    _set_number(page, "lg-num", 1)
    _css(page, "#lg-generate").click()
    WebDriverWait(page, WAIT, poll_frequency=0.05).until(
        lambda d: _status(d).startswith("Drawing codes")
    )
    done, total = (int(x) for x in _status(page).split(":")[1].split("/"))
    assert total == 128 * 128 and 0 < done < total
    _css(page, "#lg-cancel").click()
    WebDriverWait(page, WAIT).until(lambda d: _css(d, "#lg-cancel-note").text == "Cancelling...")
    WebDriverWait(page, WAIT).until(lambda d: _status(d).startswith(("Cancelled", "Done")))
    assert _status(page).startswith("Cancelled"), _status(page)
    assert len(list((server["root"] / "out").glob("run-*"))) == runs
    _set_number(page, "lg-height", 16)
    _set_number(page, "lg-width", 16)
    assert _generate(page).startswith("Done")


def test_tokenizer_tab(page, server, tmp_path, artifacts):
    rgb = np.zeros((20, 22, 3), np.uint8)
    rgb[:, :11] = (255, 0, 0)
    path = tmp_path / "photo.png"
    Image.fromarray(rgb).save(path)
    page.find_element(By.XPATH, "//button[@role='tab' and contains(., 'Tokenizer')]").click()
    _upload(page, "lg-tok-file", path)
    _css(page, "#lg-tok-run").click()
    WebDriverWait(page, WAIT).until(lambda d: "PSNR" in _css(d, "#lg-tok-status").text)
    text = _css(page, "#lg-tok-status").text
    assert "image 20x20, codes 5x5" in text, text  # cropped to a whole number of codes
    folder = sorted((server["root"] / "out").glob("tokenize-*"))[-1]
    recon = Image.open(folder / "reconstruction.png")
    assert recon.size == (20, 20)
    assert Image.open(folder / "code-grid.png").size == (20, 20)
    assert np.load(folder / "codes.npy", allow_pickle=False).shape == (1, 5, 5)
    page.save_screenshot(str(artifacts / "serve-tokenizer.png"))


def test_nothing_is_written_outside_the_output_folder(server):
    out = server["root"] / "out"
    outside = [p for p in server["root"].rglob("*") if out not in p.parents and p != out]
    stray = [p for p in outside if p.is_file() and not p.is_relative_to(server["root"] / "pipe")]
    assert not stray, "only the pipeline (the test's input) lives beside the output folder"
    from gradio.utils import get_upload_folder

    assert Path(get_upload_folder()).resolve().is_relative_to(out.resolve())
    uploads = list((out / ".gradio").rglob("*.png"))
    assert uploads, "Gradio's uploads went to <out>/.gradio"
