"""Make docs/app.png: the Gradio app with a real model, one story generated, in headless Chromium.

    python docs/screenshot.py [--model checkpoints/trm-tinystories-small] [--out docs/app.png]

Needs selenium and Debian's chromium + chromium-driver (as tests/app/test_browser.py). Serves app.py's demo
on a free loopback port, types the prompt, generates with a fixed seed and per-token ACT on, opens the
per-step table and saves the page.
"""

import argparse
import importlib.util
import shutil
import socket
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(REPO / "checkpoints" / "trm-tinystories-small"))
    parser.add_argument("--out", default=str(REPO / "docs" / "app.png"))
    parser.add_argument("--prompt", default="Once upon a time, there was a little dog named Max.")
    parser.add_argument("--seed", type=int, default=3)
    args = parser.parse_args(argv)

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    spec = importlib.util.spec_from_file_location("trm_app", REPO / "app.py")
    app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app)
    model, tokenizer = app.load_model_and_tokenizer(args.model, device="cpu")
    demo = app.build_demo(model, tokenizer, default_seed=args.seed)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    app.serve(demo).launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)

    options = webdriver.ChromeOptions()
    options.binary_location = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))))
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1300"):
        options.add_argument(flag)
    options.page_load_strategy = "eager"
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        driver.get(f"http://127.0.0.1:{port}/")
        wait = WebDriverWait(driver, 120)
        prompt = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#prompt textarea"))
        prompt.clear()
        prompt.send_keys(args.prompt)
        driver.find_element(By.CSS_SELECTOR, "#generate-btn").click()
        wait.until(lambda d: "new tokens" in d.find_element(By.CSS_SELECTOR, "#status").text)
        driver.save_screenshot(args.out)
    finally:
        driver.quit()
        demo.close()
        demo.decoder.close()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
