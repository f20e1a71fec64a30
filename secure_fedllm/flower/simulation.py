"""`secure-fedllm run --engine flower`: the same job on Flower's simulation engine, via `flwr run`.

`flwr run` against a SuperLink in simulation mode is Flower's current entry point (its
`run_simulation` function is deprecated). We start that SuperLink ourselves, with its own temporary
Flower home, free ports on 127.0.0.1, runtime dependency installation off, and stop it by its
process group when the run ends, so nothing touches the user's `~/.flwr` or outlives the command.
The app is `secure_fedllm.flower.app` (see `examples/flower_app` for the same app as a project of
its own); results land in the usual run folder.

What simulation does not give: every party lives on this machine, in Ray worker processes that
share one OS user, so it demonstrates the protocol and the engine, not secrecy from the server.

The malicious setting (the default): before the run, `provision_sites` opens each client's state
folder under `<out>.sites` (creating its Ed25519 identity key there), collects the public keys as
the roster, and writes each site's `policy.toml` (its `SitePolicy`: the RunConfig's assumptions and
that roster) beside its key. The SuperLink and its workers get `SECURE_FEDLLM_SITES` in their
environment (this machine's, not the server's run config), from which each node's Mod reads its
policy and key; the server learns the keys only by asking the nodes.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import RunConfig
from ..errors import SecureFedLLMError
from ..site.policy import check_setting

if TYPE_CHECKING:
    from ..federation.federation import RunResult

__all__ = [
    "APP_PYPROJECT",
    "FlowerEngineError",
    "flwr_run",
    "provision_sites",
    "run_simulation",
    "simulation_superlink",
    "write_app",
]

APP_PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "secure-fedllm-flower-app"
version = "1.0.0"
description = "Federated LoRA + DP-SGD with secure aggregation (secure-fedllm) on Flower"
license = "Apache-2.0"
dependencies = ["secure-fedllm[flower]"]

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "secure-fedllm"

[tool.flwr.app.components]
serverapp = "secure_fedllm.flower.app:server_app"
clientapp = "secure_fedllm.flower.app:client_app"

[tool.flwr.app.config]
config = ""
out = "runs/flower"
train-timeout = 3600.0
stage-timeout = 120.0
signed-roster = ""
"""


class FlowerEngineError(SecureFedLLMError):
    """Flower's engine did not start or the run did not finish; the message holds its log's tail."""


def write_app(folder: Path) -> Path:
    """Write the Flower app project (pyproject.toml) into `folder`; return the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text(APP_PYPROJECT)
    return folder


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def flower_env(home: Path) -> dict[str, str]:
    """Environment for Flower's processes: our interpreter's scripts first, this package importable."""
    env = dict(os.environ)
    env["FLWR_HOME"] = str(home)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    env["RAY_DEDUP_LOGS"] = "1"
    return env


def wait_healthy(port: int, process: subprocess.Popen[bytes], log: Path, timeout: float = 90.0) -> None:
    """Block until the SuperLink answers /health on `port`, or raise with its log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise FlowerEngineError(f"the SuperLink exited with {process.returncode}:\n{_tail(log)}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise FlowerEngineError(f"the SuperLink did not become healthy within {timeout} s:\n{_tail(log)}")


def stop(process: subprocess.Popen[bytes], grace: float = 15.0) -> None:
    """Stop a process we started (and its children, by process group) within a bounded time."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=grace)
    except ProcessLookupError:
        pass


def provision_sites(config: RunConfig, sites: Path) -> list[bytes]:
    """Give every client of `config` an identity key and a site policy file pinning all clients' keys.

    Each client's state folder is `site_folder(sites, i)` (as the runner and the Flower ClientApp
    open it); its key stays there, and `policy.toml` next to it names that key and pins the roster.
    Returns the roster (public keys in client order).
    """
    from ..federation.runner import open_site
    from ..site import SitePolicy, site_policy_path, site_security_policy

    states = [open_site(config, sites, i) for i in range(config.federation.clients)]
    roster = [state.identity_public_key for state in states]
    security = site_security_policy(config, roster=roster)
    for i, state in enumerate(states):
        policy = SitePolicy(security=security, identity_key=state.identity_key_path.name, state_dir=".")
        policy.to_file(site_policy_path(sites, i))
    return roster


@contextlib.contextmanager
def simulation_superlink(work: Path, extra_env: dict[str, str] | None = None) -> Iterator[dict[str, str]]:
    """A SuperLink in simulation mode with its own Flower home under `work`, stopped on exit.

    Yields the environment for `flwr` commands; the connection is named `sim`. `extra_env` goes to
    the SuperLink (hence to the simulated nodes).
    """
    home = work / "home"
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "sim"\n\n[superlink.sim]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    env = {**flower_env(home), **(extra_env or {})}
    log = work / "superlink.log"
    command = [
        "flower-superlink", "--insecure", "--simulation", "--database", str(home / "state.db"),
        "--host", "127.0.0.1", "--port", str(port),
        "--disable-runtime-dependency-installation",
    ]  # fmt: skip
    with open(log, "wb") as sink:
        superlink = subprocess.Popen(command, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_healthy(port, superlink, log)
        yield env
    finally:
        stop(superlink)


def flwr_run(
    app: Path, env: dict[str, str], *, run_config: dict[str, str], supernodes: int, cpus: int = 1, timeout: float
) -> None:
    """`flwr run APP sim --stream` with run-config and federation-config overrides; raise if it fails."""
    overrides = " ".join(f"{k}={json.dumps(v)}" for k, v in run_config.items())
    federation = f"num-supernodes={supernodes} client-resources-num-cpus={cpus}"
    command = ["flwr", "run", str(app), "sim", "--run-config", overrides, "--federation-config", federation, "--stream"]
    done = subprocess.run(command, env=env, timeout=timeout, check=False)
    if done.returncode != 0:
        raise FlowerEngineError(f"`flwr run` exited with {done.returncode}")


def run_simulation(
    config: RunConfig,
    *,
    out: str | Path,
    cpus_per_client: int = 1,
    timeout: float = 6 * 3600.0,
) -> RunResult:
    """Run `config` on Flower's simulation engine (one SuperNode per client) and return the result.

    Raises:
        FlowerEngineError: the engine failed to start or the run did not complete.
    """
    from ..federation.federation import RunResult
    from ..federation.folder import open_run_folder

    out = Path(out).resolve()
    folder = open_run_folder(config, out, None)  # refuses another run's folder before Flower starts
    if folder.finished:
        print(f"{out} already holds this finished run; nothing to do")
        return RunResult.of_folder(folder.paths, folder.rows)
    started = time.time()
    work = Path(tempfile.mkdtemp(prefix="secure-fedllm-flower-"))
    config_file = work / "config.toml"
    config.to_file(config_file)
    from ..site import SITES_ENV

    check_setting(config)
    # Where each simulated node keeps its state (flower.client.node_config_path): set on this machine by
    # the launcher, so the nodes never take their state folder from the run config the server writes.
    sites = Path(f"{out}.sites")
    extra_env = {SITES_ENV: str(sites)}
    if config.secure_aggregation.setting == "malicious" and config.secure_aggregation.protocol in ("secagg", "secagg+"):
        provision_sites(config, sites)
    try:
        with simulation_superlink(work, extra_env) as env:
            flwr_run(
                write_app(work / "app"),
                env,
                run_config={"config": str(config_file), "out": str(out)},
                supernodes=config.federation.clients,
                cpus=cpus_per_client,
                timeout=timeout,
            )
    except FlowerEngineError as exc:
        raise FlowerEngineError(f"{exc}\n{_tail(work / 'superlink.log')}") from exc
    try:
        result = _load_result(out, config, started)
    except FlowerEngineError as exc:  # `flwr run --stream` exits 0 even when the ServerApp raised
        raise FlowerEngineError(f"{exc}\n{_tail(work / 'superlink.log')}") from exc
    shutil.rmtree(work, ignore_errors=True)
    return result


def _load_result(out: Path, config: RunConfig, started: float) -> RunResult:
    """The run the ServerApp just finished in `out`, checked to be this run (not an older one left there)."""
    from ..errors import ConfigError
    from ..federation.federation import RunResult
    from ..federation.folder import open_run_folder

    try:
        folder = open_run_folder(config, out, None)
    except ConfigError as exc:
        raise FlowerEngineError(f"the Flower run left {out} unreadable: {exc}") from None
    if not folder.finished:
        raise FlowerEngineError(f"the Flower run stopped after round {folder.start - 1}; see {out}")
    if folder.paths.report.stat().st_mtime < started:
        raise FlowerEngineError(f"{folder.paths.report} predates this run: the ServerApp did not finish it")
    return RunResult.of_folder(folder.paths, folder.rows)


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
