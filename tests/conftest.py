"""Shared fixtures: the repository, the offline tiny model, and a subprocess environment."""

from __future__ import annotations

import importlib
import itertools
import logging
import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def tiny_model_dir() -> Path:
    """The offline tiny model (built once, like scripts/setup.sh does)."""
    path = ROOT / ".cache" / "tiny"
    if not (path / "model.safetensors").exists():
        from llamafactory_longpo.tiny import make_tiny_model

        make_tiny_model(str(path))
    return path


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    return tiny_model_dir()


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture):
    """The toolkit's loggers do not propagate to the root logger: listen on theirs."""
    root = logging.getLogger("llamafactory")
    root.addHandler(caplog.handler)
    yield caplog
    root.removeHandler(caplog.handler)


def train_in_process(
    config: dict[str, Any], capfd: pytest.CaptureFixture, logs: pytest.LogCaptureFixture, callbacks: Any = None
) -> tuple[int, str]:
    """``llamafactory-cli train`` as the toolkit's ``run_exp`` in this process: (exit status, all output).

    An exception that escapes it fails the test (the CLI would show it as a traceback)."""
    from llamafactory.train.tuner import run_exp

    try:
        run_exp(args=config, callbacks=callbacks)
        code = 0
    except SystemExit as err:
        code = err.code
    except KeyboardInterrupt:  # would end the whole pytest session
        pytest.fail("Ctrl-C escaped the training run")
    out = capfd.readouterr()
    # a logging handler some library bound to an earlier test's (now closed) capture stream reports that on
    # every record: pytest's artefact, not the run's
    text = re.sub(r"--- Logging error ---\n.*?\nArguments: .*?\n", "", out.out + out.err, flags=re.S)
    return code, text + logs.text


def benchmark_module(monkeypatch: pytest.MonkeyPatch, name: str) -> Any:
    """``benchmarks/<name>.py`` imported as running it by path would (its folder first on ``sys.path``, so it
    finds its siblings); the path and the benchmark modules it imported are removed when the test ends."""
    folder = ROOT / "benchmarks"
    monkeypatch.syspath_prepend(str(folder))
    module = importlib.import_module(name)
    for key, loaded in list(sys.modules.items()):
        if Path(getattr(loaded, "__file__", None) or "/").parent == folder:
            monkeypatch.setitem(sys.modules, key, sys.modules.pop(key))  # absent before: dropped at teardown
    return module


def cli_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
        HF_HUB_OFFLINE="1",
        WANDB_DISABLED="true",
        DISABLE_VERSION_CHECK="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
    )
    env.update(extra)
    return env


_PORT_CALLS = itertools.count()


def port_block(worker: str, workers: int) -> range:
    """The ports test process ``worker`` (xdist's ``gw0``, ``gw1``...; "" for a plain run) draws from, one of
    ``workers`` + 1 equal blocks of 20000-31999, so no two processes of one run share a port.

    The suite runs in xdist workers (scripts/test.sh), each starting torchrun rendezvous, DeepSpeed process
    groups and LlamaBoard servers. A kernel-chosen port (bind to 0) is free when asked but not reserved: another
    worker could be handed the same one before the server binds it. The blocks never overlap, and they lie
    below Linux's ephemeral range (32768 up), where the kernel numbers its own sockets.
    """
    size = 12_000 // (workers + 1)
    first = 20_000 + size * (int(worker.removeprefix("gw")) + 1 if worker else 0)
    return range(first, first + size)


def own_port_block() -> range:
    """This test process's ``port_block``."""
    return port_block(os.environ.get("PYTEST_XDIST_WORKER", ""), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))


def free_port() -> int:
    """A free TCP port on the loopback interface from this process's ``port_block``, a new one each call (the
    last run's may still be closing)."""
    block = own_port_block()
    for _ in range(len(block)):
        port = block[next(_PORT_CALLS) % len(block)]
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError(f"no free port in {block.start}-{block.stop - 1}")


def torchrun_env(grad_norm_file: Path, nproc: int = 2) -> dict[str, str]:
    """Environment for a ``FORCE_TORCHRUN`` run on CPU, each rank logging its gradient norm."""
    return dict(
        FORCE_TORCHRUN="1",
        NNODES="1",
        NPROC_PER_NODE=str(nproc),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        LLAMAFACTORY_LONGPO_GRAD_NORM_FILE=str(grad_norm_file),
    )


def run_cli(args: list[str], cwd: Path, timeout: int = 600, **env: str) -> subprocess.CompletedProcess:
    """``llamafactory-cli`` as a real subprocess (stdout and stderr captured together)."""
    return run_command([str(VENV_BIN / "llamafactory-cli"), *args], cwd, timeout, **env)


def start_cli(args: list[str], cwd: Path, **popen: Any) -> subprocess.Popen:
    """``llamafactory-cli`` started as a real subprocess in the CLI environment (stdout and stderr together), for a
    test that signals it while it runs or limits it (``popen``: more ``subprocess.Popen`` keywords)."""
    cmd = [str(VENV_BIN / "llamafactory-cli"), *args]
    return subprocess.Popen(cmd, cwd=cwd, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def run_command(cmd: list[str], cwd: Path, timeout: int = 600, **env: str) -> subprocess.CompletedProcess:
    """Any command as a real subprocess, in the CLI environment (stdout and stderr captured together)."""
    return subprocess.run(
        cmd,
        cwd=cwd,
        env=cli_env(**env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
    )


def write_yaml(path: Path, config: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


# LongPO on the demo's multi-turn documents (their long rows need the longer cutoff)
LONGPO_RUN = dict(stage="longpo", pref_loss="sigmoid", dataset="longpo_demo", cutoff_len=2048)


def base_config(tiny: Path, out: Path, **overrides) -> dict:
    """A small CPU training config over the demo data (the tiny examples' settings)."""
    config = {
        "model_name_or_path": str(tiny),
        "stage": "solopo",
        "do_train": True,
        "finetuning_type": "full",
        "pref_loss": "orpo",
        "dataset": "solopo_demo",
        "dataset_dir": str(ROOT),
        "template": "qwen",
        "cutoff_len": 1536,
        "short_cutoff_len": 512,
        "max_samples": 8,
        "overwrite_cache": True,
        "preprocessing_num_workers": 1,
        "output_dir": str(out),
        "logging_steps": 1,
        "save_steps": 1000,
        "plot_loss": True,
        "overwrite_output_dir": True,
        "report_to": "none",
        "per_device_train_batch_size": 2,
        "learning_rate": 1.0e-4,
        "num_train_epochs": 1.0,
        "seed": 0,
    }
    config.update(overrides)
    return config
