"""LlamaBoard in a real browser: pick SoLoPO / LongPO, set their controls, preview, train, check the run.

Headless Debian Chromium driven by Playwright against ``llamafactory-cli webui`` on 127.0.0.1, with
the offline tiny model and the demo data. Nothing is mocked. Screenshots of the form are kept in
``test-artifacts/``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, VENV_BIN, cli_env, free_port

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = ROOT / "test-artifacts"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not os.path.exists(CHROMIUM), reason="Debian's chromium package is not installed (scripts/setup.sh installs it)"
    ),
]


@pytest.fixture(scope="module")
def board(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path):
    """A running LlamaBoard (its working folder is a temp dir: runs land in its saves/)."""
    work = tmp_path_factory.mktemp("board")
    port = free_port()
    env = cli_env(GRADIO_SERVER_NAME="127.0.0.1", GRADIO_SERVER_PORT=str(port), GRADIO_ANALYTICS_ENABLED="False")
    log = open(work / "webui.log", "w")
    proc = subprocess.Popen(
        [str(VENV_BIN / "llamafactory-cli"), "webui"],
        cwd=work,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError((work / "webui.log").read_text()[-3000:]) from None
            time.sleep(0.5)
    else:
        raise RuntimeError("LlamaBoard did not start")
    yield {"url": url, "work": work, "model": tiny_model}
    os.killpg(proc.pid, 9)
    proc.wait()
    log.close()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        yield b
        b.close()


def _input(page, label: str):
    """The input of a component: dropdowns carry ``aria-label``; textboxes sit inside a <label> whose text
    starts with the label (and goes on with the help text)."""
    aria = page.locator(f'input[aria-label="{label}"], textarea[aria-label="{label}"]')
    if aria.count():
        return aria.first
    return page.locator("label", has_text=re.compile("^\\s*" + re.escape(label))).first.locator("input, textarea").first


def _type(page, label: str, value: str) -> None:
    """Fill a textbox and make sure the value stuck (the board's own events may rewrite fields)."""
    box = _input(page, label)
    for _ in range(20):
        box.fill(value)
        box.press("Tab")
        page.wait_for_timeout(300)
        if box.input_value() == value:
            return
    raise AssertionError(f"{label}: could not set {value!r}, field shows {box.input_value()!r}")


def _choose(page, label: str, value: str) -> None:
    """Pick a value in the gradio dropdown labelled ``label``."""
    _pick(page, _input(page, label), value)


def _pick(page, box, value: str) -> None:
    """Pick a value in a gradio dropdown: type it, then click the matching option.

    The box is focused, not clicked: the Tab that leaves the previous field may already have focused this
    dropdown and opened its option list, which can lie over the box and swallow a pointer click (seen in CI).
    Focusing opens the list just the same, and ``fill`` filters it."""
    box.focus()
    box.fill(value)
    page.get_by_role("option", name=value, exact=True).first.click()


def _slider_number(page, label: str, value: str) -> None:
    """Sliders show a number box next to their label."""
    title = page.get_by_text(re.compile("^" + re.escape(label) + "$"))
    box = page.locator(".block", has=title).locator("input[type=number]").first
    box.fill(value)
    box.press("Tab")


def _number(page, elem_id: str, value: float) -> None:
    field = page.locator(f"#{elem_id} input").first
    field.fill(str(value))
    field.press("Tab")


def _fill_common(page, board: dict, stage: str, dataset: str, out: str) -> None:
    _choose(page, "Model name", "Qwen2.5-0.5B-Instruct")
    # choosing a model name may rewrite "Model path" a moment later: typed now, checked again at the end
    _type(page, "Model path", str(board["model"]))
    _choose(page, "Finetuning method", "full")
    _choose(page, "Stage", stage)
    _type(page, "Data dir", str(ROOT))
    _choose(page, "Dataset", dataset)
    page.keyboard.press("Escape")
    _type(page, "Max samples", "12")  # 6 steps: the board logs every 5
    _type(page, "Epochs", "1")
    _choose(page, "Compute type", "fp32")
    _slider_number(page, "Cutoff length", "2048")
    _slider_number(page, "Batch size", "2")
    _slider_number(page, "Gradient accumulation", "1")
    out_box = _input(page, "Output dir")
    out_box.focus()  # focused, not clicked: see _pick
    out_box.fill(out)
    out_box.press("Enter")
    _type(page, "Model path", str(board["model"]))  # once more: a late model-name event may have rewritten it


def _run(page, board: dict, stage: str, dataset: str, out: str, controls: dict, shot: str) -> dict:
    page.goto(board["url"])
    page.locator('input[aria-label="Stage"]').wait_for(timeout=60000)
    _fill_common(page, board, stage, dataset, out)
    panel = page.locator(f"#s2l_{stage.lower()}_tab")
    panel.wait_for(state="visible", timeout=10000)
    for name, value in controls.items():
        if isinstance(value, str):
            _pick(page, page.locator(f"#s2l_{name} input").first, value)
        else:
            _number(page, f"s2l_{name}", value)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / shot), full_page=True)

    page.get_by_role("button", name="Preview command").click()
    preview = page.locator(".prose").filter(has_text="llamafactory-cli train").first
    preview.wait_for(timeout=30000)
    command = preview.inner_text()

    page.get_by_role("button", name="Start").click()
    run_dir = board["work"] / "saves" / "Qwen2.5-0.5B-Instruct" / "full" / out
    deadline = time.time() + 300
    while time.time() < deadline and not (run_dir / "train_results.json").exists():
        time.sleep(1)
    assert (run_dir / "train_results.json").exists(), (board["work"] / "webui.log").read_text()[-3000:]
    page.get_by_text(re.compile("Finished|finished")).first.wait_for(timeout=60000)
    page.screenshot(path=str(ARTIFACTS / shot.replace(".png", "_done.png")), full_page=True)
    args = yaml.safe_load((run_dir / "training_args.yaml").read_text())
    logs = [json.loads(line) for line in (run_dir / "trainer_log.jsonl").read_text().splitlines()]
    return {"command": command, "args": args, "logs": logs, "running_log": (run_dir / "running_log.txt").read_text()}


def test_solopo_from_the_board(board: dict, browser) -> None:
    page = browser.new_page(viewport={"width": 1400, "height": 2200})
    result = _run(
        page,
        board,
        "SoLoPO",
        "solopo_demo",
        "solopo_board",
        {"solopo_pref_loss": "simpo", "solopo_alpha": 2.5, "solopo_distance": "square"},
        "board_solopo.png",
    )
    assert "--stage solopo" in result["command"] or "stage: solopo" in result["command"]
    assert "solopo_alpha" in result["command"] and "2.5" in result["command"]
    args = result["args"]
    assert args["stage"] == "solopo" and args["pref_loss"] == "simpo"
    assert args["solopo_alpha"] == 2.5 and args["solopo_distance"] == "square"
    steps = [entry for entry in result["logs"] if "loss" in entry]
    assert steps and {"align_loss", "po_loss", "rewards/long_chosen"} <= set(steps[0])
    assert "'align_loss'" in result["running_log"]  # the board's log box shows the new metrics

    # config save/load round-trips the plugin's controls
    page.get_by_role("button", name="Save arguments").click()
    page.get_by_text(re.compile("saved", re.IGNORECASE)).first.wait_for(timeout=30000)
    _number(page, "s2l_solopo_alpha", 7.0)
    assert float(page.locator("#s2l_solopo_alpha input").first.input_value()) == 7.0
    page.get_by_role("button", name="Load arguments").click()
    page.wait_for_function("parseFloat(document.querySelector('#s2l_solopo_alpha input').value) === 2.5", timeout=30000)
    assert page.locator("#s2l_solopo_distance input").first.input_value() == "square"
    page.close()


def test_dataset_list_offers_only_short_to_long_data(board: dict, browser, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "dataset_info.json").write_text(
        json.dumps(
            {
                "s2l": {"file_name": "s2l.jsonl", "formatting": "short_to_long", "ranking": True},
                "plain_pairs": {"file_name": "pairs.json", "ranking": True},
                "plain_sft": {"file_name": "sft.json"},
            }
        )
    )
    page = browser.new_page(viewport={"width": 1400, "height": 1400})
    page.goto(board["url"])
    page.locator('input[aria-label="Stage"]').wait_for(timeout=60000)
    _type(page, "Data dir", str(data))
    offered = {}
    for stage in ("SoLoPO", "LongPO", "S2LD", "DPO"):
        _choose(page, "Stage", stage)
        _input(page, "Learning rate").focus()  # leave the dataset box so that focusing it lists again
        _input(page, "Dataset").focus()
        page.get_by_role("option").first.wait_for(timeout=10000)
        seen: set[str] = set()
        for _ in range(20):  # the list is refreshed by an event: read until it is stable
            page.wait_for_timeout(500)
            now = set(page.get_by_role("option").all_inner_texts())
            if now == seen:
                break
            seen = now
        offered[stage] = seen
        page.keyboard.press("Escape")
    assert offered["SoLoPO"] == offered["LongPO"] == offered["S2LD"] == {"s2l"}
    assert offered["DPO"] == {"s2l", "plain_pairs"}
    page.close()


def test_longpo_from_the_board(board: dict, browser) -> None:
    page = browser.new_page(viewport={"width": 1400, "height": 2200})
    result = _run(
        page,
        board,
        "LongPO",
        "longpo_demo",
        "longpo_board",
        {"longpo_lambda": 0.2, "longpo_nll_scope": "response", "longpo_beta": 0.3},
        "board_longpo.png",
    )
    args = result["args"]
    assert args["stage"] == "longpo" and args["pref_loss"] == "sigmoid"
    assert args["longpo_lambda"] == 0.2 and args["longpo_nll_scope"] == "response" and args["pref_beta"] == 0.3
    assert "longpo_lambda" in result["command"]
    steps = [entry for entry in result["logs"] if "loss" in entry]
    assert steps and {"nll_loss", "pref_loss"} <= set(steps[0])
    page.close()


def test_s2ld_from_the_board(board: dict, browser) -> None:
    page = browser.new_page(viewport={"width": 1400, "height": 2200})
    result = _run(
        page,
        board,
        "S2LD",
        "solopo_demo",
        "s2ld_board",
        {"s2ld_divergence": "jsd", "s2ld_jsd_beta": 0.25, "s2ld_nll_weight": 0.5},
        "board_s2ld.png",
    )
    args = result["args"]
    assert args["stage"] == "s2ld" and args["s2ld_divergence"] == "jsd"
    assert args["s2ld_jsd_beta"] == 0.25 and args["s2ld_nll_weight"] == 0.5
    assert "s2ld_divergence" in result["command"]
    steps = [entry for entry in result["logs"] if "loss" in entry]
    assert steps and {"s2ld/divergence", "s2ld/nll"} <= set(steps[0])
    page.close()


def test_sequence_parallel_control_reaches_the_command(board: dict, browser) -> None:
    """The board's sequence-parallel control (preview only: one CPU process cannot run P = 2)."""
    page = browser.new_page(viewport={"width": 1400, "height": 2200})
    page.goto(board["url"])
    page.locator('input[aria-label="Stage"]').wait_for(timeout=60000)
    _fill_common(page, board, "LongPO", "longpo_demo", "longpo_sp_board")
    page.locator("#s2l_longpo_tab").wait_for(state="visible", timeout=10000)
    preview = page.locator(".prose").filter(has_text="llamafactory-cli train").first
    page.get_by_role("button", name="Preview command").click()
    preview.wait_for(timeout=30000)
    assert "sequence_parallel_size" not in preview.inner_text()  # off (1) by default: not written
    _number(page, "s2l_longpo_sequence_parallel", 2)
    page.get_by_role("button", name="Preview command").click()
    page.wait_for_function(
        "[...document.querySelectorAll('.prose')].some(e => /sequence_parallel_size\\W+2\\b/.test(e.innerText))", timeout=30000
    )
    page.close()
