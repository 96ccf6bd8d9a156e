"""The Prefect UI end to end, in headless Chromium, against the real stack (Prefect, MLflow, worker).

1. A data scientist opens the ``training/nightly`` deployment, presses Run -> Custom run, changes the
   parameters (JSON input of ``params``, and a workspace) and submits; the run completes on the worker,
   the UI shows it Completed and MLflow holds its run.
2. A reviewer opens a suspended ``retrain/on-drift`` run, resumes it through the form Prefect renders from
   ``ApprovalDecision``, and the approved version becomes the MLflow ``champion``.

The UI under test is Prefect's default UI (V2, React, under ``/v2``); paths are pinned to ``/v2`` so the
test does not depend on a browser's saved UI preference. Screenshots, page source and console of a failing
step are kept under ``test-artifacts/e2e/``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable

import pytest

from tests.conftest import fast_parameters
from tests.e2e import browser as ui
from tests.stack_helpers import mlflow_client, mlflow_runs_of, read_run, wait_for

pytestmark = pytest.mark.e2e
MODEL_NAME = "edgeloop-digits"
RUN_TIMEOUT_S = 240.0


# ---- fixtures ------------------------------------------------------------------------------------------

@pytest.fixture(scope="session", autouse=True)
def chromium_binaries() -> tuple[str, str]:
    """Checked before ``stack`` starts any service: no browser, no e2e (skip; fail on CI)."""
    return ui.require_browser()


@pytest.fixture
def driver(chromium_binaries, tmp_path):
    """Headless Chromium with a fresh profile in tmp_path (chromedriver's log next to it)."""
    session = ui.start_chromium(tmp_path / "chromium-profile", tmp_path / "chromedriver.log")
    yield session
    session.quit()


@pytest.fixture
def step(driver, tmp_path, request):
    """``with step("name"):`` keeps the browser's evidence (test-artifacts/e2e/) when the block fails."""
    def _step(name: str):
        return ui.evidence_on_failure(driver, f"{request.node.name}-{name}", tmp_path / "chromedriver.log")
    return _step


# ---- Prefect and MLflow helpers (API side) -------------------------------------------------------------

def read_deployment_id(name: str):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_deployment_by_name(name).id


def wait_final(flow_run_id, timeout_s: float = RUN_TIMEOUT_S):
    """The flow run once it reached a final state; fails with its last state when it does not."""
    last = {}

    def final():
        run = last["run"] = read_run(flow_run_id)
        return run if run.state and run.state.is_final() else None

    try:
        return wait_for(final, timeout_s, f"flow run {flow_run_id} to finish")
    except AssertionError as error:
        state = last.get("run") and last["run"].state
        raise AssertionError(f"{error}; last state: {state.name if state else None} "
                             f"({state.message if state else ''})") from None


def header_state(driver, run_name: str) -> str | None:
    """The state badge next to the run's name in the header of its page (None until it is shown)."""
    from selenium.webdriver.common.by import By

    badges = driver.find_elements(By.XPATH, f"//nav[@aria-label='breadcrumb'][.//*[normalize-space()="
                                            f"{ui.text_literal(run_name)}]]/following-sibling::*[1]"
                                            "//*[@data-slot='badge']")
    return badges[0].text.strip() if badges and badges[0].is_displayed() else None


def wait_header_state(driver, run_name: str, expected: str) -> None:
    ui.wait(driver).until(lambda d: header_state(d, run_name) == expected,
                          f"the page of flow run {run_name} does not show {expected!r}")


# ---- 1. custom run of training/nightly from the deployment page ----------------------------------------

def test_custom_run_from_the_deployment_page_trains_and_logs_to_mlflow(stack, driver, step, tmp_path):
    from selenium.webdriver.common.keys import Keys

    base = f"{stack.prefect_url}/v2"
    workspace = tmp_path / "nightly-from-ui"
    params = fast_parameters(epochs=3)  # the one change from the fast settings: 3 epochs, not 2

    with step("open-deployment"):
        driver.get(f"{base}/")
        ui.click(driver, "(//a[normalize-space()='Deployments'])[1]")  # the sidebar
        ui.click(driver, "//a[normalize-space()='nightly']")
        ui.wait(driver).until(lambda d: "/deployments/deployment/" in d.current_url, "the deployment page")
        deployment_id = read_deployment_id("training/nightly")
        assert str(deployment_id) in driver.current_url

    with step("custom-run-form"):
        ui.click(driver, ui.button("Run"))
        ui.click(driver, ui.menu_item("Custom run"))
        ui.wait(driver).until(lambda d: re.search(r"/deployments/deployment/[^/]+/run", d.current_url),
                              "the custom run form")
        run_name = ui.visible(driver, "//label[normalize-space()='Run Name']/following::input[1]").get_attribute(
            "value")
        assert run_name, "the form proposes no run name"
        # params: switch the property to its JSON input and paste the whole parameter object
        params_field = ui.form_field("params")
        ui.click(driver, f"({params_field}//button[@aria-haspopup='menu'])[1]")
        ui.click(driver, ui.menu_item("Use JSON Input"))
        editor_xpath = f"{params_field}//*[contains(@class, 'cm-content')][@contenteditable='true']"
        editor = ui.clickable(driver, editor_xpath)
        editor.click()
        editor.send_keys(Keys.CONTROL, "a")
        editor.send_keys(Keys.DELETE)
        ui.insert_text(driver, json.dumps(params, indent=2))
        ui.wait(driver).until(lambda d: editor_json(d, editor_xpath) == params, "the pasted JSON in the editor")
        # workspace: a str instead of None
        workspace_field = ui.form_field("workspace")
        ui.click(driver, f"{workspace_field}//button[@role='tab'][normalize-space()='str']")
        ui.clickable(driver, f"{workspace_field}//textarea").send_keys(str(workspace))
        # the confirmation toast links to the new flow run
        toast = ("//li[@data-sonner-toast][.//*[@data-title][starts-with(normalize-space(), "
                 f"{ui.text_literal(run_name + ' scheduled')})]]//a[contains(@href, '/runs/flow-run/')]")
        href = submit_until_scheduled(driver, toast)
        flow_run_id = href.rstrip("/").rsplit("/", 1)[-1]

    flow_run = read_run(flow_run_id)
    assert flow_run.name == run_name and flow_run.deployment_id == deployment_id
    assert flow_run.parameters["params"] == params and flow_run.parameters["workspace"] == str(workspace)
    assert not flow_run.parameters.get("package", False)  # the form's default: no images from this run
    assert flow_run.parameters["params"]["epochs"] == 3
    final = wait_final(flow_run_id)
    assert final.state.is_completed(), f"{final.state.name}: {final.state.message}"

    with step("run-page"):
        driver.get(href)
        wait_header_state(driver, run_name, "Completed")

    runs = mlflow_runs_of(stack, flow_run_id)
    assert len(runs) == 1, f"{len(runs)} MLflow runs tagged prefect.flow_run_id={flow_run_id}"
    assert runs[0].data.params["train.epochs"] == "3"
    assert json.loads(runs[0].data.tags["prefect.overrides"])["epochs"] == 3
    assert (workspace / "reports").is_dir()  # the outputs went to the workspace given in the form


ERROR_TOAST = ("//li[@data-sonner-toast][@data-type='error' or "
               "contains(translate(normalize-space(), 'ERROR', 'error'), 'error')]")


def press_until_closed(driver, button_xpath: str, dialog_xpath: str, attempts: int = 3,
                       done: Callable[[], bool] = lambda: False) -> None:
    """Press a dialog's button until the dialog closes; retry (bounded) when the server asked to (503 toast).
    ``done``: the server already did what the press asks (a loaded host's UI can lag behind it): never press
    again then, a second resume of a resumed run is not what a person means."""
    for attempt in range(1, attempts + 1):
        ui.click(driver, button_xpath)
        ui.wait(driver).until(lambda d: not d.find_elements("xpath", dialog_xpath)
                              or d.find_elements("xpath", ERROR_TOAST) or done(),
                              "the dialog to close, an error toast or the server to have done it")
        if not driver.find_elements("xpath", dialog_xpath) or done():
            return
        if attempt < attempts:
            ui.gone(driver, ERROR_TOAST)
    raise AssertionError(f"the dialog stayed open after {attempts} presses: "
                         f"{driver.find_elements('xpath', ERROR_TOAST)[0].text}")


def submit_until_scheduled(driver, toast_xpath: str, attempts: int = 3) -> str:
    """Press Submit and return the new run's link from the toast.

    The SQLite-backed test server answers 503 ("retry") while its database is briefly locked; Prefect's
    Python client retries those by itself, the UI shows "Unknown error while creating flow run" and
    leaves the form as it was, so a person presses Submit again. So does this, a bounded number of times.
    """
    from selenium.common.exceptions import TimeoutException

    error_toast = ERROR_TOAST
    for attempt in range(1, attempts + 1):
        ui.click(driver, "//button[@type='submit'][normalize-space()='Submit']")
        try:
            outcome = ui.wait(driver).until(
                lambda d: d.find_elements("xpath", toast_xpath) or d.find_elements("xpath", error_toast),
                "a toast after Submit")
        except TimeoutException:
            raise AssertionError("no confirmation or error toast after Submit") from None
        link = driver.find_elements("xpath", toast_xpath)
        if link:
            return link[0].get_attribute("href")
        if attempt < attempts:
            ui.gone(driver, error_toast)
    raise AssertionError(f"the server refused to create the run {attempts} times: {outcome[0].text}")


def editor_json(driver, editor_xpath: str):
    """The JSON in a CodeMirror editor (None while it does not parse)."""
    from selenium.webdriver.common.by import By

    text = driver.find_element(By.XPATH, editor_xpath).get_attribute("innerText")
    try:
        return json.loads(text)
    except ValueError:
        return None


# ---- 2. resume a suspended retrain run with the approval form ------------------------------------------

def test_resume_form_approves_the_retrained_model_as_champion(stack, images, driver, step, tmp_path):
    from prefect.deployments import run_deployment

    base = f"{stack.prefect_url}/v2"
    flow_run = run_deployment(name="retrain/on-drift", timeout=0, parameters={
        "params": fast_parameters(), "workspace": str(tmp_path / "retrain"), "approval_timeout_s": 900})

    def suspended():
        run = read_run(flow_run.id)
        assert not run.state.is_final(), f"retrain ended before the approval: {run.state.name}: {run.state.message}"
        return run if run.state.is_paused() else None

    paused = wait_for(suspended, RUN_TIMEOUT_S, "the retrain run to wait for approval")
    assert paused.state.name == "Suspended"
    runs = mlflow_runs_of(stack, flow_run.id)
    assert len(runs) == 1, f"{len(runs)} MLflow runs tagged prefect.flow_run_id={flow_run.id}"
    client = mlflow_client(stack)
    versions = client.search_model_versions(f"name = '{MODEL_NAME}' and run_id = '{runs[0].info.run_id}'")
    assert len(versions) == 1
    version = str(versions[0].version)
    assert str(client.get_model_version_by_alias(MODEL_NAME, "candidate").version) == version

    with step("resume-form"):
        driver.get(f"{base}/runs/flow-run/{flow_run.id}")
        wait_header_state(driver, paused.name, "Suspended")
        ui.click(driver, "(//nav[@aria-label='breadcrumb']/following::button[@aria-haspopup='menu'])[1]")
        ui.click(driver, ui.menu_item("Resume"))
        dialog = "//*[@role='dialog'][.//*[normalize-space()='Resume Flow Run']]"
        ui.visible(driver, dialog)
        switch = ui.clickable(driver, f"{ui.form_field('Approve', dialog)}//button[@role='switch']")
        switch.click()
        ui.wait(driver).until(lambda _: switch.get_attribute("aria-checked") == "true", "approve switched on")
        ui.clickable(driver, f"{ui.form_field('Reviewer', dialog)}//textarea").send_keys("ui-reviewer")
        ui.clickable(driver, f"{ui.form_field('Comment', dialog)}//textarea").send_keys("approved in the UI")
        press_until_closed(driver, f"{dialog}{ui.button('Resume')}", dialog,
                           done=lambda: not read_run(flow_run.id).state.is_paused())

    final = wait_final(flow_run.id, 600)  # packaging first: on a new machine it builds the base image
    assert final.state.is_completed(), f"{final.state.name}: {final.state.message}"

    with step("resumed-run-page"):
        driver.refresh()
        wait_header_state(driver, paused.name, "Completed")

    assert len(mlflow_runs_of(stack, flow_run.id)) == 1  # resuming re-ran the flow without a second candidate
    champion = client.get_model_version_by_alias(MODEL_NAME, "champion")
    assert str(champion.version) == version
    assert champion.tags["approved_by"] == "ui-reviewer"
    assert champion.tags["approval_comment"] == "approved in the UI"
    assert champion.tags["approved_at"]
    assert champion.tags["image.amd64"].startswith(f"{images.registry}/")  # packaged before the promotion
