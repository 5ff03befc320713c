"""The app in a real browser: headless Chromium (Debian `chromium` + `chromium-driver`) driven by selenium.

Types a prompt, clicks Generate, waits for the streamed story and the depth view, saves a screenshot
(to the test's tmp dir, and to $TRM_SCREENSHOT_DIR when set). On the Puzzles tab: enters a Sudoku, clicks
Solve and checks the grid of every supervision step. Gradio keeps connections open, so the
test waits for elements, never for network idle.
"""

import os
import re
import shutil
from pathlib import Path

import pytest
from helpers import running_app, slow_down

from puzzles.solve import load_solver

pytestmark = [pytest.mark.browser,
              pytest.mark.filterwarnings("ignore::DeprecationWarning:gradio.queueing")]  # gradio's own pandas use

CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
CHROMEDRIVER = shutil.which("chromedriver")
PROMPT = "Tom and Lily went to the park."
SUDOKU = "........6.1..5..3......43...5.2...6."  # 6x6 with one solution, from the project's generator


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("headless Chromium needs the chromium and chromedriver binaries "
                    "(Debian: apt-get install chromium chromium-driver); not found on PATH")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1500"):
        options.add_argument(flag)
    options.page_load_strategy = "eager"  # DOM ready is enough; gradio's open connections never go idle
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)  # explicit driver: no downloads
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def app(tiny_model_dir):
    with running_app(tiny_model_dir, default_seed=1234) as (url, model, tokenizer):
        yield url, tokenizer, model


def open_and_generate(browser, app_url: str, **number_inputs):
    """Load the app, type PROMPT, set the given number boxes ({elem_id: value}), click Generate; return a wait."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(app_url)
    wait = WebDriverWait(browser, 60)
    prompt = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#prompt textarea"))
    prompt.clear()
    prompt.send_keys(PROMPT)
    for elem_id, value in number_inputs.items():
        box = browser.find_element(By.CSS_SELECTOR, f"#{elem_id.replace('_', '-')} input[type=number]")
        box.clear()
        box.send_keys(str(value), Keys.TAB)
    browser.find_element(By.CSS_SELECTOR, "#generate-btn").click()
    return wait


def test_story_streams_into_the_page_with_its_depth_view(browser, app, tmp_path):
    from selenium.webdriver.common.by import By

    app_url, tokenizer, _ = app
    # the fixture's halt head stops about half the tokens at 0.5
    wait = open_and_generate(browser, app_url, halt_threshold=0.5)

    # the summary line appears once the stream has ended and the depth view is filled
    wait.until(lambda d: "new tokens" in d.find_element(By.CSS_SELECTOR, "#status").text)
    story = browser.find_element(By.CSS_SELECTOR, "#story textarea").get_attribute("value")
    assert story.startswith(PROMPT) and story[len(PROMPT):].strip(), f"no generated text: {story!r}"

    depth = browser.find_element(By.CSS_SELECTOR, "#depth")
    tokens = depth.find_elements(By.CSS_SELECTOR, ".token.highlighted")
    legend = [item.text for item in depth.find_elements(By.CSS_SELECTOR, ".legend-item")]
    # the colour scale covers every depth the app can run: up to 2x the fixture's 2 trained steps
    assert legend == ["1 step", "2 steps", "3 steps", "4 steps"]
    colours = {token.value_of_css_property("background-color") for token in tokens}
    assert len(colours) == 2  # tokens that exited after step 1 and tokens that ran both look different
    status = browser.find_element(By.CSS_SELECTOR, "#status").text
    assert f"{len(tokens)} new tokens" in status

    # per-step predictions, on demand: open the accordion, the table lists the top-3 after each step
    browser.find_element(By.CSS_SELECTOR, "#predictions-accordion button.label-wrap").click()
    table = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#predictions"))  # rendered when opened
    wait.until(lambda d: "step 2 top-k" in table.text)
    cells = table.text.splitlines()  # headers, then the cells row by row
    first_position = 1 + len(tokenizer(PROMPT)["input_ids"])  # the first generated token, after BOS and the prompt
    assert cells[cells.index("step 2 top-k") + 1] == str(first_position)
    assert re.search(r"0\.\d{3}, .* 0\.\d{3}, .* 0\.\d{3}", table.text)  # three predictions with probabilities

    shots = [tmp_path / "app.png"]
    if os.environ.get("TRM_SCREENSHOT_DIR"):
        Path(os.environ["TRM_SCREENSHOT_DIR"]).mkdir(parents=True, exist_ok=True)
        shots.append(Path(os.environ["TRM_SCREENSHOT_DIR"]) / "app.png")
    for shot in shots:
        assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000


def test_stop_keeps_the_story_and_says_it_stopped(browser, app, monkeypatch):
    import time

    from selenium.webdriver.common.by import By

    app_url, _, model = app
    slow_down(model, monkeypatch, 0.05)  # the tiny model would finish before anyone could press Stop
    wait = open_and_generate(browser, app_url, max_new_tokens=100)
    story_box = browser.find_element(By.CSS_SELECTOR, "#story textarea")
    wait.until(lambda d: len(story_box.get_attribute("value")) > len(PROMPT) + 5)  # some new text streamed in
    browser.find_element(By.CSS_SELECTOR, "#stop-btn").click()

    wait.until(lambda d: "Stopped" in d.find_element(By.CSS_SELECTOR, "#status").text)
    stopped_at = story_box.get_attribute("value")
    time.sleep(1.0)
    assert story_box.get_attribute("value") == stopped_at  # nothing more arrives
    assert stopped_at.startswith(PROMPT) and len(stopped_at) > len(PROMPT)
    assert "Generating" not in browser.find_element(By.CSS_SELECTOR, "#status").text
    errors = [e for e in browser.find_elements(By.CSS_SELECTOR, ".error, .toast-body.error") if e.is_displayed()]
    assert not errors, [e.text for e in errors]


def test_a_typed_value_outside_a_sliders_range_is_reported(browser, app):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    app_url, _, _ = app
    browser.get(app_url)
    wait = WebDriverWait(browser, 60)
    box = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#max-new-tokens input[type=number]"))
    high = box.get_attribute("max")
    box.clear()
    box.send_keys("5000", Keys.TAB)
    note = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#range-note").text or None)
    assert note == f"Max new tokens: 5000 is outside 1 to {high}, so {high} is used."
    assert box.get_attribute("value") == high  # the slider's own clamping, now said out loud
    box.clear()
    box.send_keys("7", Keys.TAB)  # a value in range clears the note
    wait.until(lambda d: not d.find_element(By.CSS_SELECTOR, "#range-note").text)


@pytest.fixture(scope="module")
def puzzle_app(tiny_model_dir, tiny_solver_dir):
    solver = load_solver(tiny_solver_dir)
    with running_app(tiny_model_dir, puzzle_solver=solver, puzzle_step_delay=0.1) as (url, _, _):
        yield url, solver


def test_puzzles_tab_shows_the_grid_after_every_step(browser, puzzle_app, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    app_url, solver = puzzle_app
    browser.get(app_url)
    wait = WebDriverWait(browser, 60)
    wait.until(lambda d: d.find_element(By.XPATH, "//button[@role='tab'][normalize-space()='Puzzles']")).click()
    box = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#puzzle textarea"))
    box.clear()
    box.send_keys(SUDOKU)
    browser.find_element(By.CSS_SELECTOR, "#solve-btn").click()

    wait.until(lambda d: "valid Sudoku" in d.find_element(By.CSS_SELECTOR, "#puzzle-status").text)
    result = solver.solve(SUDOKU)  # the tab's defaults: the trained steps, halting off
    figures = browser.find_elements(By.CSS_SELECTOR, "#puzzle-steps figure.sudoku-step")
    assert len(figures) == result.steps_used
    status = browser.find_element(By.CSS_SELECTOR, "#puzzle-status").text
    assert result.steps_description() in status and "consistent with the clues" in status
    for figure, step in zip(figures, result.steps):
        cells = figure.find_elements(By.CSS_SELECTOR, "td.cell")
        assert len(cells) == 36 and f"Step {step.step} · P(halt)" in figure.text
        assert len(figure.find_elements(By.CSS_SELECTOR, "td.changed")) == step.changed.sum()
        amber = {cell.value_of_css_property("background-color")
                 for cell in figure.find_elements(By.CSS_SELECTOR, "td.changed:not(.clash)")}
        assert amber <= {"rgba(253, 230, 138, 1)"}  # highlighted (red instead where a clue was overwritten)
    clues = figures[0].find_elements(By.CSS_SELECTOR, "td.clue b")
    assert len(clues) == int((result.puzzle != 0).sum())
    assert all(int(clue.value_of_css_property("font-weight")) >= 700 for clue in clues)

    shots = [tmp_path / "puzzles.png"]
    if os.environ.get("TRM_SCREENSHOT_DIR"):
        shots.append(Path(os.environ["TRM_SCREENSHOT_DIR"]) / "puzzles.png")
    for shot in shots:
        assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
