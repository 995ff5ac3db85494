"""The dashboard in a real browser (Debian's chromium, headless, through chromedriver) against a live
`srcompress serve` (API + a real worker on SQLite): a wrong key is told clearly; uploads, a job's submit
and its cancel work from the keyboard; a tiny job is watched to `succeeded` with its curves drawn; the
report, the before/after slider, "try it" on a dropped image and the model's download all work; every
form control has a label; webhooks of that job reach a local receiver, signed and in order.
Screenshots land in runs/test-artifacts/dashboard/ (SRCOMPRESS_TEST_ARTIFACTS overrides)."""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import torch
from PIL import Image
from safetensors.torch import load as load_safetensors

from core.models.build import create_model
from store import webhooks
from tests.browser import UNLABELLED_CONTROLS, chromium, drop_file, screenshot, until
from tests.service_helpers import REPO, embedded_server, png_bytes, zip_bytes
from tests.webhook_receiver import Receiver, receiver_server

JOB_TIMEOUT_S = 420
TINY_JOB = {  # the lifecycle tests' tiny job, with two validations so the PSNR curve has points
    "lambda": 1e-3,
    "prune_iters": 2,
    "distill_iters": 4,
    "batch_size": 2,
    "patch_size": 16,
    "validate_every": 2,
    "checkpoint_every": 2,
    "device": "cpu",
}


@contextmanager
def served(tmp: Path) -> Iterator[tuple[str, str]]:
    """`srcompress serve` (it migrates, prints the first key, starts a worker); yields (url, key)."""
    extra_env = {
        "SRCOMPRESS_WEBHOOK_ALLOW_PRIVATE": "true",  # the receiver is on 127.0.0.1
        "SRCOMPRESS_WEBHOOK_POLL_SECONDS": "0.2",
        "SRCOMPRESS_HEARTBEAT_SECONDS": "1",  # a canceled job stops within a second or two
        "SRCOMPRESS_LEASE_SECONDS": "15",
    }
    with embedded_server(tmp, extra_env) as (url, key, _log):
        yield url, key


def teacher_checkpoint(path: Path) -> Path:
    torch.manual_seed(0)
    torch.save(create_model("rlfn_s", 2).state_dict(), path)
    return path


def text_of(driver, css: str) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, css).text


def unlabelled(driver) -> list[str]:
    return driver.execute_script(UNLABELLED_CONTROLS)


def type_into(driver, label: str, text: str, clear: bool = True) -> None:
    """Keyboard input into the control labelled ``label`` (found through its label, as a user would)."""
    from selenium.webdriver.common.by import By

    target = driver.find_element(By.XPATH, f"//label[normalize-space()={json.dumps(label)}]")
    control = driver.find_element(By.ID, target.get_attribute("for"))
    if clear:
        control.clear()
    control.send_keys(text)


def choose(driver, label: str, option_text_contains: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    target = driver.find_element(By.XPATH, f"//label[normalize-space()={json.dumps(label)}]")
    select = Select(driver.find_element(By.ID, target.get_attribute("for")))
    until(
        lambda: any(option_text_contains in o.text for o in select.options),
        20,
        f"option {option_text_contains}",
    )
    select.select_by_visible_text(next(o.text for o in select.options if option_text_contains in o.text))


def tab_to(driver, element_id: str, presses: int = 60) -> None:
    """Press Tab until ``element_id`` has the focus (keyboard only)."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    for _ in range(presses):
        if driver.execute_script("return document.activeElement && document.activeElement.id") == element_id:
            return
        ActionChains(driver).send_keys(Keys.TAB).perform()
    raise AssertionError(f"#{element_id} never got the keyboard focus in {presses} Tab presses")


def submit_job_with_keyboard(driver, params: dict, webhook_url: str = "") -> str:
    """Fill the submit form and press Enter in its last field; returns the new job's id (from the URL)."""
    from selenium.webdriver.common.keys import Keys

    driver.get(driver.current_url.split("#")[0] + "#/jobs")
    until(lambda: "Submit job" in text_of(driver, "form.submit-job"), 30, "the submit form")
    choose(driver, "Teacher model", "teacher")
    choose(driver, "Training dataset", "tiny")
    choose(driver, "Validation dataset", "tiny")
    type_into(
        driver,
        "More parameters (JSON: any field of the job, e.g. target_params, budget_minutes, distill_iters)",
        json.dumps(params),
    )
    type_into(driver, "Webhook URL (optional)", webhook_url + Keys.ENTER)  # Enter submits the form
    until(lambda: re.search(r"#/jobs/([0-9a-f-]{36})$", driver.current_url), 30, "the job page")
    return driver.current_url.rsplit("/", 1)[-1]


@pytest.mark.slow
def test_the_dashboard_end_to_end(tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    downloads = tmp_path / "downloads"
    teacher_path = teacher_checkpoint(tmp_path / "teacher.pth")
    dataset_path = tmp_path / "tiny.zip"
    dataset_path.write_bytes(zip_bytes({f"{i}.png": png_bytes(48, 48, seed=i) for i in range(4)}))
    receiver = Receiver()
    with served(tmp_path) as (url, key), receiver_server(receiver) as hook_url, chromium(downloads) as driver:
        client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60)
        driver.get(f"{url}/")  # / sends the browser to the dashboard
        until(lambda: driver.current_url.startswith(f"{url}/ui/"), 20, "the dashboard")

        # A wrong key: a clear message, and nothing kept.
        type_into(driver, "API key", "src_deadbeef_not-a-real-key" + Keys.ENTER)
        until(lambda: "not accepted" in text_of(driver, "#alert"), 20, "the rejected-key message")
        screenshot(driver, "01-wrong-key")
        assert driver.execute_script("return sessionStorage.getItem('srcompress.apiKey')") is None
        assert unlabelled(driver) == []

        type_into(driver, "API key", key + Keys.ENTER)
        until(lambda: text_of(driver, "#key-state") == "key in use", 20, "the key accepted")
        assert key not in driver.current_url  # never in a URL

        # Uploads from the Models and Datasets pages.
        driver.get(f"{url}/ui/#/models")
        until(
            lambda: driver.find_element(By.CSS_SELECTOR, "form.upload input[type=file]"),
            20,
            "the upload form",
        )
        assert unlabelled(driver) == []
        driver.find_element(By.CSS_SELECTOR, "form.upload input[type=file]").send_keys(str(teacher_path))
        type_into(driver, "Name (optional)", "teacher" + Keys.ENTER)
        until(lambda: "Uploaded teacher" in text_of(driver, "#status"), 60, "the model upload")
        driver.get(f"{url}/ui/#/datasets")
        until(
            lambda: driver.find_element(By.CSS_SELECTOR, "form.upload input[type=file]"),
            20,
            "the upload form",
        )
        assert unlabelled(driver) == []
        driver.find_element(By.CSS_SELECTOR, "form.upload input[type=file]").send_keys(str(dataset_path))
        type_into(driver, "Name (optional)", "tiny" + Keys.ENTER)
        until(lambda: "tiny" in text_of(driver, "table"), 60, "the dataset in the list")

        # Submit and cancel with the keyboard alone.
        long_job = submit_job_with_keyboard(driver, {**TINY_JOB, "distill_iters": 100_000})
        until(lambda: driver.find_element(By.ID, "cancel-job").is_displayed(), 30, "the cancel button")
        assert unlabelled(driver) == []
        tab_to(driver, "cancel-job")
        driver.switch_to.active_element.send_keys(Keys.ENTER)
        until(
            lambda: client.get(f"/v1/jobs/{long_job}").json()["state"] == "canceled", 90, "the job canceled"
        )
        until(lambda: text_of(driver, "#job-state") == "canceled", 30, "the page showing canceled")
        screenshot(driver, "02-canceled")

        # The tiny job, with a webhook, watched to the end.
        secret = client.post("/v1/webhooks/secret").json()["secret"]
        job_id = submit_job_with_keyboard(driver, TINY_JOB, webhook_url=hook_url)
        until(
            lambda: (
                text_of(driver, "#job-state")
                in ("distilling", "evaluating", "exporting", "quantizing", "succeeded")
            ),
            JOB_TIMEOUT_S,
            "the job running",
        )
        state = until(
            lambda: (
                text_of(driver, "#job-state") in ("succeeded", "failed", "canceled")
                and text_of(driver, "#job-state")
            ),
            JOB_TIMEOUT_S,
            "the job finished",
        )
        assert state == "succeeded", client.get(f"/v1/jobs/{job_id}").json()
        until(lambda: driver.find_element(By.ID, "report"), 60, "the report")
        points = driver.execute_script(
            "return [...document.querySelectorAll('#charts svg')].map((s) => Number(s.dataset.points))"
        )
        assert len(points) == 3 and all(n > 0 for n in points), points  # pruning, distillation, PSNR
        report_text = text_of(driver, "#report")
        assert "student − teacher" in report_text and "chosen (N_c, N_l, N_b)" in report_text
        until(
            lambda: driver.execute_script(
                "const plots = [...document.querySelectorAll('[data-artifact]')];"
                "return plots.length === 3 && plots.every((i) => i.complete && i.naturalWidth > 0)"
            ),
            30,
            "the three plots",
        )
        assert unlabelled(driver) == []
        # Readable on a laptop screen: nothing wider than the window.
        assert driver.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
        driver.execute_script("document.getElementById('job-title').scrollIntoView()")
        screenshot(driver, "03-job-succeeded")
        driver.execute_script("document.getElementById('report').scrollIntoView()")
        screenshot(driver, "04-report")

        # The before/after slider, moved with the keyboard.
        viewer = until(
            lambda: driver.find_element(By.CSS_SELECTOR, ".compare-viewer[data-loaded]"), 60, "crops"
        )
        tab_to(driver, "divider")
        ActionChains(driver).send_keys(*[Keys.ARROW_RIGHT] * 20).perform()
        until(lambda: viewer.get_attribute("data-split") == "70", 10, "the divider moved")
        assert "--split: 70%" in viewer.get_attribute("style")
        choose(driver, "Right of the divider", "teacher")
        until(
            lambda: viewer.get_attribute("data-loaded").endswith(":bicubic:teacher"), 30, "the teacher crop"
        )
        assert driver.execute_script(
            "return [...document.querySelectorAll('.compare-viewer img')].every((i) => i.naturalWidth > 0)"
        )
        driver.execute_script("document.getElementById('compare').scrollIntoView()")
        screenshot(driver, "05-before-after")

        # Try it: drop an image, see it upscaled beside bicubic, download it.
        drop_file(driver, "#drop-zone", "mine.png", png_bytes(40, 30, seed=7))
        until(
            lambda: (
                driver.execute_script(
                    "const i = document.getElementById('try-student');"
                    "return i && i.complete && i.naturalWidth"
                )
                == 80
            ),
            90,
            "the student's upscale",
        )
        driver.find_element(By.ID, "try-download").send_keys(Keys.ENTER)
        upscaled = until(
            lambda: (downloads / "mine-x2.png").exists() and downloads / "mine-x2.png", 30, "the download"
        )
        assert Image.open(upscaled).size == (80, 60)
        driver.execute_script("document.getElementById('try-it').scrollIntoView()")
        screenshot(driver, "06-try-it")

        # Download the compact model from its page.
        model_id = client.get(f"/v1/jobs/{job_id}").json()["result_model_id"]
        model = client.get(f"/v1/models/{model_id}").json()
        assert {"model.safetensors", "config.json"} <= set(model["files"])
        driver.find_element(By.CSS_SELECTOR, "#job-results [data-file='model.safetensors']").click()
        saved = until(
            lambda: (downloads / "model.safetensors").exists() and downloads / "model.safetensors",
            30,
            "the model download",
        )
        until(lambda: not list(downloads.glob("*.crdownload")), 30, "the download finished")
        tensors = load_safetensors(saved.read_bytes())
        assert sum(t.numel() for t in tensors.values()) == model["params"]

        # Delete the (no longer used) dataset from its page.
        driver.get(f"{url}/ui/#/datasets")
        delete = until(
            lambda: driver.find_element(By.XPATH, "//button[normalize-space()='Delete tiny']"), 20, "delete"
        )
        delete.send_keys(Keys.ENTER)
        until(lambda: driver.switch_to.alert, 10, "the confirmation").accept()
        until(lambda: "Deleted tiny" in text_of(driver, "#status"), 20, "the dataset deleted")
        assert all(d["name"] != "tiny" for d in client.get("/v1/datasets").json()["items"])

        # The job's webhooks: every event, in order, each one signed with the rotated secret.
        until(lambda: any(p["type"] == "job.succeeded" for p in receiver.delivered()), 30, "job.succeeded")
        mine = [r for r in receiver.requests if json.loads(r["body"])["job"]["id"] == job_id]
        types = [json.loads(r["body"])["type"] for r in mine]
        assert (
            types[0] == "job.started" and types[-1] == "job.succeeded" and set(types[1:-1]) == {"job.stage"}
        )
        stages = [json.loads(r["body"])["job"]["state"] for r in mine]
        assert stages[:2] == ["preparing", "pruning"] and "distilling" in stages
        for request in mine:
            headers = request["headers"]
            assert webhooks.verify_signature(
                secret,
                headers[webhooks.TIMESTAMP_HEADER],
                headers[webhooks.SIGNATURE_HEADER],
                request["body"],
            )
        client.close()


def test_a_missing_browser_fails_under_ci(monkeypatch, tmp_path):
    """Without chromium the browser test is skipped locally and fails under CI=true."""
    import tests.browser as browser

    monkeypatch.setattr(browser, "CHROMIUM", str(tmp_path / "no-chromium"))
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="no-chromium is missing"):
        with chromium(tmp_path):
            pass
    monkeypatch.setenv("CI", "false")
    with pytest.raises(pytest.skip.Exception):
        with chromium(tmp_path):
            pass


def test_the_dashboard_is_served_without_a_key(tmp_path):
    """The static files need no key (the data behind them does) and load nothing from elsewhere."""
    from fastapi.testclient import TestClient

    from api.app import create_app
    from store.db import migrate
    from store.settings import Settings

    settings = Settings(data_dir=tmp_path)
    migrate(settings.database_url)
    ui_dir = REPO / "api" / "ui"
    with TestClient(create_app(settings)) as client:
        assert client.get("/", follow_redirects=False).headers["location"] == "/ui/"
        page = client.get("/ui/")
        assert page.status_code == 200 and 'type="module" src="js/app.js"' in page.text
        for path in sorted(ui_dir.rglob("*.*")):
            relative = path.relative_to(ui_dir).as_posix()
            answer = client.get(f"/ui/{relative}")
            assert answer.status_code == 200, relative
            assert not re.search(
                r"(src|href)=\"https?://|import .* from \"https?://|url\(https?://", answer.text
            )
        assert client.get("/v1/jobs/x/crops").status_code == 401
    # Every relative import of every module names a file that exists.
    for module in ui_dir.glob("js/*.js"):
        for target in re.findall(r'from "\./([\w.]+)"', module.read_text()):
            assert (module.parent / target).exists(), (module.name, target)


def test_crops_need_a_finished_job_of_the_caller(app_client):
    from store.apikeys import create_api_key
    from store.db import session_factory
    from store.jobs import create_job

    client, key_id, _, engine = app_client
    with session_factory(engine).begin() as session:
        other, _ = create_api_key(session, "other")
        queued, _ = create_job(session, config={}, owner_key_id=key_id)
        foreign, _ = create_job(session, config={}, owner_key_id=other.id)
        queued_id, foreign_id = queued.id, foreign.id
    assert client.get(f"/v1/jobs/{queued_id}/crops").json()["error"]["code"] == "not_ready"
    assert client.get(f"/v1/jobs/{foreign_id}/crops").status_code == 404
    assert client.get(f"/v1/jobs/{queued_id}/crops/0/ghost.png").status_code == 404
    upscaled = client.post("/v1/bicubic", files={"file": ("a.png", png_bytes(10, 8))}, data={"scale": "3"})
    assert upscaled.status_code == 200 and Image.open(io.BytesIO(upscaled.content)).size == (30, 24)
    bad = client.post("/v1/bicubic", files={"file": ("a.png", b"not an image")}, data={"scale": "2"})
    assert bad.status_code == 422
