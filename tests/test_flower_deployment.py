"""The example Flower app as a real deployment: `flower-superlink` and two `flower-supernode` processes talking over
127.0.0.1, the app submitted with `flwr run` (the SuperLink started with `--disable-runtime-dependency-installation`,
so no `uv sync`: every process uses this environment), against `examples/flower_app/simulate.py` on the same
federation. Every process the test starts, and everything they start (SuperExec, ServerApp and ClientApp processes),
is stopped by the test, also when it fails.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

# Process start-ups (torch, transformers, the packaged MiniLM) for every round's ClientApps: 2 to 5 minutes.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
APP = ROOT / "examples" / "flower_app"
BIN = Path(sys.executable).parent  # flower-superlink, flower-supernode, flwr (and the flower-superexec they start)
SETTINGS = {"num-server-rounds": 3, "num-clients": 2, "clients-per-round": 2}
DEADLINE = 540.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, log: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"exited with {process.returncode}:\n{log.read_text()[-3000:]}"
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise AssertionError(f"nothing listens on 127.0.0.1:{port} after {timeout} s:\n{log.read_text()[-3000:]}")


class Processes:
    """Started processes, each in its own session; `stop()` ends them and all their descendants (Flower starts its
    SuperExec in a new session, so a process group would not reach it) and returns those still alive after."""

    def __init__(self, folder: Path, env: dict[str, str]):
        self.folder, self.env = folder, env
        self.started: dict[str, subprocess.Popen] = {}

    def start(self, name: str, argv: list[str]) -> tuple[subprocess.Popen, Path]:
        log = self.folder / f"{name}.log"
        with open(log, "w") as out:
            process = subprocess.Popen(
                argv, env=self.env, cwd=self.folder, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.started[name] = process
        return process, log

    def stop(self) -> list[psutil.Process]:
        tree: list[psutil.Process] = []
        for process in self.started.values():
            try:
                root = psutil.Process(process.pid)
                tree += [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                pass
        for proc in tree:
            try:
                proc.send_signal(signal.SIGTERM)
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(tree, timeout=15)
        for proc in alive:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(alive, timeout=10)
        for process in self.started.values():
            if process.poll() is None:
                process.wait(timeout=5)
        return alive


def environment(flwr_home: Path) -> dict[str, str]:
    return {
        **os.environ,
        "PATH": os.pathsep.join([str(BIN), os.environ.get("PATH", "")]),
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "FLWR_HOME": str(flwr_home),  # connections and installed apps live here, not in the user's ~/.flwr
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }


def run_config(output_dir: Path) -> list[str]:
    return [f"{key}={value}" for key, value in SETTINGS.items()] + [f'output-dir="{output_dir}"']


@pytest.fixture
def deployment(tmp_path):
    """A SuperLink and two SuperNodes (partitions 0 and 1) on 127.0.0.1, and a `flwr` connection to them."""
    home = tmp_path / "flwr_home"
    home.mkdir()
    link_port = free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "deployment"\n\n[superlink.deployment]\naddress = "127.0.0.1:{link_port}"\n'
        "insecure = true\n"
    )
    processes = Processes(tmp_path, environment(home))
    try:
        link, link_log = processes.start(
            "superlink",
            [str(BIN / "flower-superlink"), "--insecure", "--disable-runtime-dependency-installation",
             "--host", "127.0.0.1", "--port", str(link_port)],
        )  # fmt: skip
        wait_for_port(link_port, link, link_log)
        for i in range(SETTINGS["num-clients"]):
            node_port = free_port()
            node, node_log = processes.start(
                f"supernode{i}",
                [str(BIN / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{link_port}",
                 "--host", "127.0.0.1", "--port", str(node_port), "--node-config", f"partition-id={i}"],
            )  # fmt: skip
            wait_for_port(node_port, node, node_log)
        yield {"processes": processes, "folder": tmp_path}
    finally:
        processes.stop()


def wait_for_summary(path: Path, processes: Processes) -> dict:
    """The ServerApp's `federation_summary.json`, once written completely."""
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        for name, process in processes.started.items():
            log = processes.folder / f"{name}.log"
            assert process.poll() is None, f"{name} exited with {process.returncode}:\n{log.read_text()[-3000:]}"
        if path.exists():
            try:
                return json.loads(path.read_text())
            except json.JSONDecodeError:
                pass  # still being written
        time.sleep(2.0)
    logs = "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in processes.folder.glob("*.log"))
    raise AssertionError(f"no {path.name} after {DEADLINE} s\n{logs}")


def test_deployment_equals_simulation(deployment):
    folder, processes = deployment["folder"], deployment["processes"]
    started = time.monotonic()
    submitted = subprocess.run(
        [str(BIN / "flwr"), "run", str(APP), "deployment", "--run-config", " ".join(run_config(folder / "deployed"))],
        env=processes.env,
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-3000:]
    assert "Successfully started run" in submitted.stdout
    deployed = wait_for_summary(folder / "deployed" / "federation_summary.json", processes)
    deployed_seconds = time.monotonic() - started
    # Every process is stopped: the three started here and what they started in sessions of their own.
    survivors = processes.stop()
    assert not survivors, [p.pid for p in survivors]

    simulated = subprocess.run(
        [sys.executable, str(APP / "simulate.py"), *run_config(folder / "simulated")],
        env=processes.env,
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert simulated.returncode == 0, simulated.stdout[-3000:] + simulated.stderr[-3000:]
    reference = json.loads((folder / "simulated" / "federation_summary.json").read_text())
    print(f"deployment: {deployed_seconds:.0f} s from `flwr run` to the summary")

    # The same federation: every client reported in every round, no replica disagreed, and the same model ...
    assert deployed["rounds"] == SETTINGS["num-server-rounds"]
    assert deployed["clients_reported"] == SETTINGS["num-server-rounds"] * SETTINGS["clients-per-round"]
    assert deployed["failed_replies"] == 0 and deployed["replica_mismatches"] == 0
    model = load_file(folder / "deployed" / "model.safetensors")
    reference_model = load_file(folder / "simulated" / "model.safetensors")
    assert model.keys() == reference_model.keys()
    for key in model:
        assert torch.equal(model[key], reference_model[key]), key
    # ... and the same ledger, losses and accuracy. Only Flower's own framing of the messages (node and run ids in
    # their metadata) differs between the two runtimes.
    framing = {k for k in reference if k.startswith("flower_bytes")}
    assert {k: v for k, v in deployed.items() if k not in framing} == {
        k: v for k, v in reference.items() if k not in framing
    }
    assert deployed["bytes_total"] > 0 and deployed["losses"][-1] < deployed["losses"][0]
