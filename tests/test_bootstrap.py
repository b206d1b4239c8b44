"""The .pth bootstrap: free for processes that never import the toolkit, switchable off, and present
in a non-editable install (checked in a fresh virtual environment, in torchrun workers)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.conftest import ROOT, VENV_BIN, base_config, cli_env, torchrun_env, write_yaml


def _py(code: str, **env: str) -> str:
    return subprocess.run(
        [sys.executable, "-c", code], env=cli_env(**env), check=True, capture_output=True, text=True, cwd="/"
    ).stdout.strip()


def test_plain_python_pays_nothing() -> None:
    code = (
        "import sys, json; print(json.dumps({'hook': any(type(f).__name__ == '_Finder' for f in sys.meta_path),"
        " 'heavy': sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'llamafactory', 'transformers')"
        " or m.startswith('llamafactory_longpo.integration'))}))"
    )
    state = json.loads(_py(code))
    assert state == {"hook": True, "heavy": []}
    assert json.loads(_py(code, LLAMAFACTORY_LONGPO_DISABLE="1")) == {"hook": False, "heavy": []}


def test_importing_the_toolkit_registers_the_stages() -> None:
    code = (
        "import json; from llamafactory.extras.constants import TRAINING_STAGES as T;"
        " from llamafactory.hparams import parser as p;"
        " f=[c for c in p._TRAIN_ARGS if 'stage' in c.__dataclass_fields__][0];"
        " print(json.dumps([T.get('SoLoPO'), T.get('LongPO'), 'solopo_alpha' in f.__dataclass_fields__]))"
    )
    assert json.loads(_py(code).splitlines()[-1]) == ["solopo", "longpo", True]
    assert json.loads(_py(code, LLAMAFACTORY_LONGPO_DISABLE="1").splitlines()[-1]) == [None, None, False]


def test_disabled_plugin_names_the_switch(tmp_path: Path, tiny_model: Path) -> None:
    """With the plugin switched off, a plugin stage on the command line is one line naming the switch (the installed
    ``.pth``), not the toolkit's "invalid choice" traceback."""
    proc = subprocess.run(
        [str(VENV_BIN / "llamafactory-cli"), "train", "--stage", "solopo", "--model_name_or_path", str(tiny_model)],
        env=cli_env(LLAMAFACTORY_LONGPO_DISABLE="1"),
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.splitlines() == [
        "[llamafactory-longpo] error: stage solopo comes from the llamafactory-longpo plugin, which "
        "LLAMAFACTORY_LONGPO_DISABLE=1 turns off; unset LLAMAFACTORY_LONGPO_DISABLE to run it"
    ]


@pytest.mark.slow
def test_wheel_install_registers_stages_in_torchrun_workers(tmp_path: Path, tiny_model: Path) -> None:
    """``pip install .`` (a wheel, not editable) into a new venv; torchrun workers must load the plugin.

    The new venv gets the plugin from the wheel only; its heavy dependencies are borrowed from the
    project venv through a plain path entry (whose own .pth files Python does not process), so the
    editable install cannot leak in.
    """
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(ROOT)],
        check=True,
        env=cli_env(),
    )
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    vpy = venv / "bin" / "python"
    subprocess.run(
        [str(vpy), "-m", "pip", "install", "-q", "--no-deps", "--no-index", *map(str, wheels.glob("*.whl"))],
        check=True,
        env=cli_env(),
    )
    site = Path(
        subprocess.run(
            [str(vpy), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    assert (site / "llamafactory_longpo.pth").exists()
    (site / "zz_borrowed_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    for name, target in (("torchrun", "torch.distributed.run"), ("llamafactory-cli", "llamafactory.cli")):
        shim = venv / "bin" / name
        shim.write_text(f"#!{vpy}\nimport sys\nfrom {target} import main\nsys.exit(main())\n")
        shim.chmod(0o755)
    where = subprocess.run(
        [str(vpy), "-c", "import llamafactory_longpo as m; print(m.__file__)"],
        cwd=tmp_path,
        check=True,
        capture_output=True,
        text=True,
        env={"PATH": os.environ["PATH"]},
    ).stdout.strip()
    assert where.startswith(str(site)), where

    out = tmp_path / "out"
    cfg = write_yaml(
        tmp_path / "cfg.yaml", base_config(tiny_model, out, per_device_train_batch_size=1, max_samples=4, ddp_backend="gloo")
    )
    grads = tmp_path / "grads"
    env = cli_env(**torchrun_env(grads))
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}"
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(
        [str(venv / "bin" / "llamafactory-cli"), "train", str(cfg)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:]
    # both workers ran the plugin's workflow (each rank writes its own diagnostic file)
    assert all(Path(f"{grads}.rank{r}").read_text().strip() for r in (0, 1))
    logs = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    assert any("align_loss" in entry for entry in logs)
