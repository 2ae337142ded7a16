#!/usr/bin/env python3
"""The web console in headless chromium (python3-selenium + chromium-driver), against a running
coordinator with two jobs training (console_browser.sh sets them up). Checks, in order:

- a page without the login cookie goes to /login; a wrong token is refused there;
- logged in with the viewer token: the jobs page lists both jobs; the job page's curves grow
  while the job trains (the chart's point count increases); clicking a task node shows that
  task (title, URL fragment, its charts and config); the viewer's job page has no "Cancel job"
  button (the coordinator refuses a viewer's cancel: console_test); the compare page overlays both jobs' tasks and
  diffs their configs (train.lr_max_per_sample and model.dropout differ), and a task ticked by
  hand gets its curve (the page fetches only the drawn tasks' history); the groups page lists
  both groups with their tasks;
- a coordinator restart: the job page goes "reconnecting", then "live" again, and its curves
  keep growing;
- an unknown job's page shows the 404; a compare link naming it still compares the other job;
- logged in with the client token: cancelling a job (submitted for it) from its page works;
  logging out clears the cookie.
Screenshots of every page go to --artifacts. Exit 77 when chromium cannot start.
"""
import argparse
import json
import os
import sys
import time
import urllib.request

try:
    from selenium import webdriver
    from selenium.common.exceptions import UnexpectedAlertPresentException, WebDriverException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
except ImportError as e:  # the package is in scripts/lib/deps.sh's test packages
    print(f"console_browser: python3-selenium is missing ({e}); scripts/test.sh installs it")
    sys.exit(1)

ap = argparse.ArgumentParser()
ap.add_argument("--url", required=True)
ap.add_argument("--client-token", required=True)
ap.add_argument("--viewer-token", required=True)
ap.add_argument("--job1", required=True)
ap.add_argument("--job2", required=True)
ap.add_argument("--artifacts", required=True)
ap.add_argument("--restart-file", required=True)
args = ap.parse_args()
client_token = open(args.client_token).read().split()[0]
viewer_token = open(args.viewer_token).read().split()[0]
failures = []


def check(condition, what):
    if condition:
        print(f"ok: {what}")
    else:
        print(f"FAIL: {what}")
        failures.append(what)
    return condition


def wait_until(what, fn, timeout=60.0, period=0.25, quiet=False):
    """Polls fn until it returns a truthy value (returned) or the timeout passes (None)."""
    deadline = time.time() + timeout
    last_error = None
    while time.time() < deadline:
        try:
            value = fn()
            if value:
                return value
        except WebDriverException as e:  # an element not there yet, a stale one
            last_error = e
        time.sleep(period)
    if not quiet:
        print(f"  (waited {timeout:.0f} s for {what}{'; last error: ' + str(last_error).splitlines()[0] if last_error else ''})")
    return None


def shot(name):
    """The whole page (the window grown to the document's height for the capture)."""
    path = os.path.join(args.artifacts, f"{name}.png")
    height, chrome = driver.execute_script(
        "return [document.documentElement.scrollHeight, window.outerHeight - window.innerHeight]")
    driver.set_window_size(1440, max(1000, min(int(height) + int(chrome), 4000)))
    time.sleep(0.3)  # the charts follow the size change
    driver.save_screenshot(path)
    driver.set_window_size(1440, 1000)
    print(f"screenshot {path}")


def points(chart_index=1):
    """The number of epochs drawn by the job page's chart (0: loss, 1: validation, 2: lr)."""
    charts = driver.find_elements(By.CSS_SELECTOR, "#charts .chart")
    if len(charts) <= chart_index:
        return 0
    return int(charts[chart_index].get_attribute("data-points") or 0)


def drawn_epochs(chart_index=0):
    """The epochs the job page's chart draws (its data-epochs), as ints."""
    charts = driver.find_elements(By.CSS_SELECTOR, "#charts .chart")
    if len(charts) <= chart_index:
        return []
    return [int(float(e)) for e in (charts[chart_index].get_attribute("data-epochs") or "").split(",") if e]


def api(path):
    """GET of the console's JSON API with the viewer token (not through the page)."""
    request = urllib.request.Request(args.url + path, headers={"Authorization": f"Bearer {viewer_token}"})
    with urllib.request.urlopen(request, timeout=30) as answer:
        return json.load(answer)


def ended_epochs(job_id, task_name):
    """The epochs of a task whose end the coordinator has, by its history."""
    rows = api(f"/api/jobs/{job_id}/history")["rows"]
    return sorted({int(r["metrics"]["epoch"]) for r in rows if r["task_id"].endswith("/" + task_name)})


# Holds the job page's history answers (received in full, so read before what comes meanwhile)
# until window.__holdHistory is false: an epoch end can then come by event while a load runs.
# The epochs whose ends reached the page by event are in window.__eventEpochs.
HOLD_HISTORY = """
window.__holdHistory = true;
window.__heldHistory = 0;
window.__eventEpochs = [];
const RealEventSource = window.EventSource;
window.EventSource = function (url, options) {
  const source = new RealEventSource(url, options);
  source.addEventListener('job', (e) => {
    const m = JSON.parse(e.data).metrics;
    if (m && m.epoch_end) window.__eventEpochs.push(Number(m.epoch || 0));
  });
  return source;
};
for (const k of ['CONNECTING', 'OPEN', 'CLOSED']) window.EventSource[k] = RealEventSource[k];
window.EventSource.prototype = RealEventSource.prototype;
const realFetch = window.fetch;
window.fetch = async function (url, options) {
  const answer = await realFetch(url, options);
  if (String(url).endsWith('/history') && window.__holdHistory) {
    window.__heldHistory += 1;
    while (window.__holdHistory) await new Promise((resolve) => setTimeout(resolve, 50));
  }
  return answer;
};
"""


def click_confirm(element_id, timeout=10.0):
    """Clicks the button and returns the confirm() dialog it opened (None if none opened).

    chromedriver may answer the click itself with "unexpected alert open" when the dialog opened
    before the click command returned (seen under load); the dialog is then still open (the
    session's unhandledPromptBehavior is "ignore", not the default "dismiss"). A click that did
    not take (a stale node, the button not there yet) is tried again."""
    def attempt():
        try:
            return driver.switch_to.alert  # an earlier attempt's click opened it after all
        except WebDriverException:
            pass
        try:
            driver.find_element(By.ID, element_id).click()
        except UnexpectedAlertPresentException:
            pass
        return wait_until("the confirm dialog", lambda: driver.switch_to.alert, timeout=2, period=0.1, quiet=True)
    confirm = wait_until(f"a confirm dialog from #{element_id}", attempt, timeout=timeout)
    if not confirm:
        try:  # one that opened after the last attempt gave up would block every later command
            driver.switch_to.alert.dismiss()
        except WebDriverException:
            pass
    return confirm


def login(token):
    driver.delete_all_cookies()
    driver.get(args.url + "/login")
    driver.find_element(By.ID, "token").send_keys(token)
    driver.find_element(By.ID, "login-submit").click()
    # The form's POST sets the cookie and redirects. A driver.get() before the answer cancels
    # the POST, and the next page redirects to /login without a cookie (CI saw this once).
    role = "client" if token == client_token else "viewer"
    check(wait_until("the login's redirect", lambda: "/login" not in driver.current_url
                     and driver.get_cookies(), timeout=30),
          f"the login with the {role} token leaves the login page (at {driver.current_url})")


options = webdriver.ChromeOptions()
for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--window-size=1440,1000", "--force-device-scale-factor=1", "--lang=en-US"):
    options.add_argument(flag)
options.binary_location = "/usr/bin/chromium"
options.set_capability("unhandledPromptBehavior", "ignore")  # see click_confirm
try:
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
except WebDriverException as e:
    # Skipped only where the browser is not installed; CI installs it, so there it is a failure.
    installed = os.path.exists("/usr/bin/chromium") and os.path.exists("/usr/bin/chromedriver")
    print(f"console_browser: chromium could not start: {str(e).splitlines()[0]}"
          + (" (it is installed: a failure)" if installed else ""))
    sys.exit(1 if installed else 77)
driver.set_page_load_timeout(30)

try:
    # Refusals: no cookie -> the login page; a wrong token -> refused there.
    driver.get(f"{args.url}/jobs/{args.job1}")
    check(wait_until("the login page", lambda: "/login" in driver.current_url and driver.find_element(By.ID, "token")),
          "a page without a token redirects to /login")
    driver.find_element(By.ID, "token").send_keys("not-a-token")
    driver.find_element(By.ID, "login-submit").click()
    check(wait_until("the login error", lambda: driver.find_element(By.ID, "login-error").is_displayed()),
          "a wrong token is refused at /login")
    shot("01-login-refused")

    # The viewer: jobs page.
    login(viewer_token)
    check(wait_until("the jobs table", lambda: len(driver.find_elements(By.CSS_SELECTOR, "#jobs-body tr")) >= 2),
          "the jobs page lists both jobs")
    rows = {r.get_attribute("data-job"): r for r in driver.find_elements(By.CSS_SELECTOR, "#jobs-body tr")}
    check(args.job1 in rows and args.job2 in rows, "the jobs page shows job1 and job2 by id")
    check("baseline" in driver.find_element(By.ID, "jobs-body").text, "the jobs page shows the job names")
    check("team=birds" in driver.find_element(By.ID, "jobs-body").text, "the jobs page shows the tags")
    check(wait_until("the live badge", lambda: "live-on" in driver.find_element(By.ID, "live").get_attribute("class")),
          "the jobs page's event stream is live")
    check(driver.find_element(By.ID, "role").text.startswith("viewer"), "the header shows the viewer role")
    wait_until("a running job's progress", lambda: "epoch" in driver.find_element(By.ID, "jobs-body").text, timeout=60)
    shot("02-jobs")

    # Job page: the curves grow.
    wait_until("the click on job1", lambda: driver.find_element(
        By.CSS_SELECTOR, f'a.job-link[href="/jobs/{args.job1}"]').click() or True)
    check(wait_until("the job page", lambda: driver.find_elements(By.CSS_SELECTOR, "#dag .task-node")),
          "the job page draws the task DAG")
    nodes = driver.find_elements(By.CSS_SELECTOR, "#dag .task-node")
    check(len(nodes) == 2, f"job1 has 2 task nodes (pretrain -> finetune), got {len(nodes)}")
    # Wait for the fine-tuning to run with an epoch drawn, then for one more.
    first = wait_until("a fine-tuning epoch on the chart",
                       lambda: "finetune" in driver.find_element(By.ID, "task-title").text and points() >= 1,
                       timeout=150)
    check(first, "the job page shows the running fine-tuning task's curves")
    before = points()
    head_buttons = {name: driver.find_element(By.ID, name) for name in ("compare-job",)}
    grew = wait_until("another epoch", lambda: points() > before, timeout=90)
    check(grew, f"the curves grow without a reload (from {before} to {points()} epochs)")
    # The head is drawn again on each event; its buttons must stay the same nodes, or a click
    # landing during an update is lost (the browser sees a stale element).
    for name, button in head_buttons.items():
        try:
            same = button.is_displayed()
        except WebDriverException as e:
            same = False
            print(f"  ({str(e).splitlines()[0]})")
        check(same, f"#{name} survives the page's updates")
    # An epoch end that comes by event while the page loads the history (read before it) is kept:
    # the refill wiped it, and the curves had a gap until the next reload.
    task_name = driver.find_element(By.ID, "task-title").text.split()[-1].split("/")[-1]
    hook = driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": HOLD_HISTORY})
    driver.refresh()
    held = wait_until("the held history", lambda: driver.execute_script("return window.__heldHistory || 0") >= 1,
                      timeout=30)
    driver.execute_cdp_cmd("Page.removeScriptToEvaluateOnNewDocument", {"identifier": hook["identifier"]})
    if check(held, "the job page's history answer is held (the race set up)"):
        read = ended_epochs(args.job1, task_name)
        ended = wait_until("an epoch end while the history is held",
                           lambda: len(ended_epochs(args.job1, task_name)) > len(read), timeout=90)
        newest = max(ended_epochs(args.job1, task_name) or [-1])
        arrived = ended and wait_until("its event on the page", lambda: driver.execute_script(
            "return window.__eventEpochs.length ? Math.max(...window.__eventEpochs) : -1") >= newest, timeout=30)
        check(arrived, f"the epoch end {newest} reached the page by event while its history was held")
        driver.execute_script("window.__holdHistory = false;")
        check(ended, f"an epoch of {task_name} ended while the page's history answer was held")
        want = ended_epochs(args.job1, task_name)
        whole = wait_until("every epoch drawn", lambda: set(want) <= set(drawn_epochs()), timeout=30)
        check(whole, f"an epoch ended during the page's load is drawn: {want} <= {drawn_epochs()}")
    check(driver.execute_script("return window.Dygraph !== undefined"), "dygraphs loaded (from /usr/share/javascript)")
    check(len(driver.find_elements(By.CSS_SELECTOR, "#charts .chart canvas")) >= 3, "the charts are drawn on canvases")
    shot("03-job-live")

    # Click through to the pretraining task.
    wait_until("the click on the pretraining task", lambda: [
        n for n in driver.find_elements(By.CSS_SELECTOR, "#dag .task-node") if "pretrain" in n.text][0].click() or True)
    check(wait_until("the pretrain task", lambda: "pretrain-f" in driver.find_element(By.ID, "task-title").text),
          "clicking a task node shows that task")
    check("task=pretrain" in driver.current_url, "the task is in the URL fragment")
    check(wait_until("pretrain points", lambda: points() >= 2), "the pretraining task's 2 epochs are drawn")
    driver.find_element(By.CSS_SELECTOR, "#task-config summary").click()
    check(wait_until("the config", lambda: "model:" in driver.find_element(By.CSS_SELECTOR, "#task-config pre").text),
          "the task's config is shown")
    check("best.pt" in driver.find_element(By.ID, "task-files").text, "the task's checkpoint paths are shown")
    shot("04-task")

    # A viewer may not cancel (the coordinator refuses it, console_test): the page offers no button.
    check(not driver.find_elements(By.ID, "cancel-job"), "the viewer's job page has no Cancel button")
    shot("05-viewer-no-cancel")

    # Compare the two jobs.
    driver.get(f"{args.url}/compare?jobs={args.job1},{args.job2}")
    check(wait_until("the config diff", lambda: "train.lr_max_per_sample" in driver.find_element(By.ID, "config-diff").text,
                     timeout=30), "the compare page diffs the configs (train.lr_max_per_sample)")
    diff = driver.find_element(By.ID, "config-diff").text
    check("model.dropout" in diff, "the diff names model.dropout")
    check(wait_until("overlaid curves", lambda: int(driver.find_element(By.CSS_SELECTOR, "#compare-chart .chart")
                                                    .get_attribute("data-points") or 0) >= 1, timeout=60),
          "the compare chart overlays the tasks' curves")
    check(len(driver.find_elements(By.CSS_SELECTOR, "#task-picker input:checked")) == 3,
          "the compare page selects the 3 tasks of both jobs")
    shot("06-compare")
    # The page fetches the history of the tasks it draws only: a link that chooses none draws
    # none, and a task ticked then gets its rows (and its curve) at once.
    driver.get(f"{args.url}/compare?jobs={args.job2}&tasks=")
    check(wait_until("job2's task", lambda: len(driver.find_elements(By.CSS_SELECTOR, "#task-picker input")) == 1,
                     timeout=30), "a compare link choosing no task lists job2's one task")
    check(not driver.find_elements(By.CSS_SELECTOR, "#task-picker input:checked") and
          "Pick tasks" in driver.find_element(By.ID, "compare-chart").text, "a link choosing no task draws none")
    wait_until("the tick", lambda: driver.find_element(By.CSS_SELECTOR, "#task-picker input").click() or True, timeout=10)
    check(wait_until("the ticked task's curve", lambda: int(driver.find_element(By.CSS_SELECTOR, "#compare-chart .chart")
                                                            .get_attribute("data-points") or 0) >= 1, timeout=60),
          "a task ticked on the compare page gets its curve")

    # Groups.
    driver.get(f"{args.url}/groups")
    check(wait_until("the groups", lambda: len(driver.find_elements(By.CSS_SELECTOR, "#groups-body tr")) == 2),
          "the groups page lists both groups")
    text = driver.find_element(By.ID, "groups-body").text
    check("mpi" in text and "cpu" in text, "the groups page shows backend and devices")
    check(wait_until("a busy group", lambda: args.job1 in driver.find_element(By.ID, "groups-body").text
                     or args.job2 in driver.find_element(By.ID, "groups-body").text, timeout=20),
          "the groups page shows the groups' current tasks")
    shot("07-groups")

    # A job that is not there: the page says so (the 404 of its event stream closes the stream;
    # the page's own load finds out why) instead of "reconnecting" for ever.
    missing = "j000000000000"
    driver.get(f"{args.url}/jobs/{missing}")
    box = wait_until("the missing job's error", lambda: driver.find_element(By.CSS_SELECTOR, "#main .error-box").text,
                     timeout=20)
    check(box and "NOT_FOUND" in box, f"a job page for an unknown job shows the coordinator's 404: {box!r}")
    # A compare link with a job that is gone still compares the others.
    driver.get(f"{args.url}/compare?jobs={args.job1},{missing}")
    check(wait_until("job1's tasks", lambda: len(driver.find_elements(By.CSS_SELECTOR, "#task-picker input:checked")) == 2,
                     timeout=30), "a compare link with an unknown job still shows the other job's 2 tasks")
    flash = wait_until("the note", lambda: driver.find_element(By.ID, "flash").text, timeout=10)
    check(flash and missing in flash, f"the compare page names the job it left out: {flash!r}")
    check(missing not in driver.current_url, f"the unknown job is dropped from the URL ({driver.current_url})")
    # A malformed id (not a job id at all: the coordinator's 400) is left out the same way.
    driver.get(f"{args.url}/compare?jobs={args.job1},jnotanid")
    check(wait_until("job1's tasks", lambda: len(driver.find_elements(By.CSS_SELECTOR, "#task-picker input:checked")) == 2,
                     timeout=30), "a compare link with a malformed job id still shows the other job's 2 tasks")
    # The default selection stays out of the URL (a sweep's every task id made a link longer than
    # the server reads); a metric chosen on the page goes in.
    driver.execute_script("const s = document.getElementById('metric'); s.value = 'val_loss';"
                          "s.dispatchEvent(new Event('change'));")
    check(wait_until("the metric in the URL", lambda: "metric=val_loss" in driver.current_url, timeout=10),
          f"the chosen metric is in the URL ({driver.current_url})")
    check("tasks=" not in driver.current_url, f"the default task selection is not in the URL ({driver.current_url})")

    # A coordinator restart: the job page reconnects and keeps growing.
    driver.get(f"{args.url}/jobs/{args.job1}")
    wait_until("the job page", lambda: points() >= 1 and "live-on" in driver.find_element(By.ID, "live").get_attribute("class"))
    before = points()
    open(args.restart_file + ".request", "w").write("restart\n")
    check(wait_until("reconnecting", lambda: "live-off" in driver.find_element(By.ID, "live").get_attribute("class"),
                     timeout=30, period=0.05), "the page notices the coordinator going away")
    done = wait_until("the restart", lambda: os.path.exists(args.restart_file + ".done"), timeout=60)
    check(done and open(args.restart_file + ".done").read().strip() == "ok", "the coordinator restarted")
    check(wait_until("live again", lambda: "live-on" in driver.find_element(By.ID, "live").get_attribute("class"),
                     timeout=30), "the page reconnects after the restart")
    check(wait_until("growth after the restart", lambda: points() > before, timeout=90),
          f"the curves keep growing after the restart ({before} -> {points()})")
    # An error said while the coordinator was away (a load that failed) goes once the job loads.
    check(wait_until("no stale error", lambda: not driver.find_elements(By.CSS_SELECTOR, "#flash.flash-error"),
                     timeout=30), "no error box is left beside the live page after the restart")
    shot("08-after-restart")

    # The client token may cancel from the page: a job submitted now (console_browser.sh answers
    # the request), so that it is still queued or training whatever job1 and job2 have done.
    open(args.restart_file + ".submit", "w").write("submit\n")
    job3 = wait_until("the job to cancel", lambda: os.path.exists(args.restart_file + ".job")
                      and open(args.restart_file + ".job").read().strip(), timeout=30)
    check(job3, f"a job to cancel was submitted ({job3})")
    login(client_token)
    driver.get(f"{args.url}/jobs/{job3}")
    confirm = click_confirm("cancel-job", timeout=30)
    if confirm:
        check(True, "the client's job page offers Cancel")
        confirm.accept()
        check(wait_until("cancelled", lambda: "cancelled" in driver.find_element(By.CSS_SELECTOR, ".page-head").text,
                         timeout=20), "a client token cancels the job from the page")
        shot("09-client-cancelled")
    else:  # (no dialog open: click_confirm dismissed any late one)
        check(False, f"the client's job page offers Cancel (at {driver.current_url})")
        shot("09-client-cancel-missing")

    # Log out: the page posts with the console's header, the cookie is cleared, pages go to /login.
    wait_until("the log-out click", lambda: driver.find_element(By.CSS_SELECTOR, 'form[action="/logout"] button').click()
               or True)
    check(wait_until("the login page", lambda: "/login" in driver.current_url, timeout=20),
          f"log out goes to the login page (at {driver.current_url})")
    driver.get(f"{args.url}/jobs")
    check(wait_until("the login page", lambda: "/login" in driver.current_url, timeout=20),
          "after log out a page redirects to /login again")

    # Browser console errors (a CSP refusal, a script error) fail the test.
    # Expected network errors: the refusals above (401, 403, the unknown job's 404, the malformed
    # job id's 400) and the restart's dropped streams.
    expected = ("status of 401", "status of 403", "status of 404", "jnotanid?checkpoints=0 - Failed to load resource: "
                "the server responded with a status of 400", "net::ERR_")  # net::ERR_*: the coordinator was down
    logs = [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"
            and not (e.get("source") == "network" and any(x in e.get("message", "") for x in expected))]
    check(not logs, f"no script errors in the browser console: {logs}")
finally:
    driver.quit()

print(f"console_browser.py: {len(failures)} failures")
sys.exit(1 if failures else 0)
