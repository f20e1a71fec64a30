"""A Flower deployment on 127.0.0.1 for tests: one SuperLink, N SuperNodes, `flwr run`, TLS certificates.

Every process runs in its own process group with its own Flower home, free ports,
telemetry off and runtime dependency installation off. `Deployment.stop()` ends everything it
started, Flower's own children included (the SuperLink starts its SuperExec detached, in a session of
its own), within a bounded time, and returns whatever survived (nothing, normally).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import signal
import ssl
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from secure_fedllm.flower.simulation import flower_env, free_port, write_app


@dataclass(frozen=True)
class Certificates:
    """A self-signed CA and a server certificate it signed, for 127.0.0.1 / localhost."""

    ca: Path
    cert: Path
    key: Path


def make_certificates(folder: Path) -> Certificates:
    """Write ca.crt, server.pem and server.key (EC P-256) into `folder`."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "secure-fedllm test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                key_encipherment=False, data_encipherment=False, key_agreement=False, encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    key = ec.generate_private_key(ec.SECP256R1())
    server = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    out = Certificates(folder / "ca.crt", folder / "server.pem", folder / "server.key")
    out.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    out.cert.write_bytes(server.public_bytes(serialization.Encoding.PEM))
    out.key.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    out.key.chmod(0o600)
    return out


def toml_string(value: str | Path) -> str:
    """A TOML basic string (paths with backslashes or quotes survive)."""
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


@dataclass
class Node:
    """One SuperNode we started."""

    partition: int
    process: subprocess.Popen[bytes]
    log: Path
    state_dir: Path


@dataclass
class Deployment:
    """SuperLink + SuperNodes on 127.0.0.1 under `work`; `tls=None` runs insecure (plain HTTP)."""

    work: Path
    tls: Certificates | None = None
    superexec_poll: float = 0.2
    port: int = 0
    superlink: subprocess.Popen[bytes] | None = None
    nodes: list[Node] = field(default_factory=list)
    runners: list[subprocess.Popen[bytes]] = field(default_factory=list)
    _seen: dict[int, psutil.Process] = field(default_factory=dict)

    # -- environment ---------------------------------------------------------------------------------

    def env(self, home: Path) -> dict[str, str]:
        """Flower's environment for one party: its own home, our interpreter first, this repo importable."""
        home.mkdir(parents=True, exist_ok=True)
        env = flower_env(home)  # its own home, our interpreter first, this repo importable, telemetry off
        env.update(
            FLWR_TELEMETRY_ENABLED="0",
            FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
            # SuperExec polls its Runtime API for tasks every second by default; each protocol
            # stage is one task (one fresh ClientApp process), so a shorter poll saves seconds per stage.
            FLWR_SUPEREXEC_TASK_POLL_INTERVAL=str(self.superexec_poll),
            PYTHONUNBUFFERED="1",
        )
        return env

    def _spawn(self, command: list[str], home: Path, log: Path, group: int = 0) -> subprocess.Popen[bytes]:
        """Start `command` in a new process group (or in `group`), its output appended to `log`."""
        env = self.env(home)
        with open(log, "ab") as sink:
            process = subprocess.Popen(
                command,
                env=env,
                cwd=home,
                stdin=subprocess.DEVNULL,
                stdout=sink,
                stderr=subprocess.STDOUT,
                process_group=group,
            )
        self._seen[process.pid] = psutil.Process(process.pid)
        return process

    # -- SuperLink ------------------------------------------------------------------------------------

    @property
    def address(self) -> str:
        """The SuperLink's one HTTP port: Fleet API (SuperNodes), Control API (`flwr`), Runtime API."""
        return f"127.0.0.1:{self.port}"

    def start_superlink(self, timeout: float = 60.0) -> None:
        """Start the SuperLink (deployment mode, not --simulation) and wait until /health answers."""
        home = self.work / "superlink"
        self.port = free_port()
        command = [
            "flower-superlink", "--host", "127.0.0.1", "--port", str(self.port),
            "--database", str(home / "state.db"), "--disable-runtime-dependency-installation",
            *self._tls_server_flags(),
        ]  # fmt: skip
        self.superlink = self._spawn(command, home, self.work / "superlink.log")
        scheme = "https" if self.tls else "http"
        context = ssl.create_default_context(cafile=str(self.tls.ca)) if self.tls else None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.superlink.poll() is not None:
                raise RuntimeError(
                    f"the SuperLink exited with {self.superlink.returncode}:\n{tail(self.work / 'superlink.log')}"
                )
            try:
                with urllib.request.urlopen(f"{scheme}://{self.address}/health", timeout=2, context=context) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.3)
        else:
            raise RuntimeError(
                f"the SuperLink did not answer /health within {timeout} s:\n{tail(self.work / 'superlink.log')}"
            )
        self.write_connection()

    def _tls_server_flags(self) -> list[str]:
        if self.tls is None:
            return ["--insecure"]
        return ["--ssl-ca-certfile", str(self.tls.ca), "--ssl-certfile", str(self.tls.cert),
                "--ssl-keyfile", str(self.tls.key)]  # fmt: skip

    def write_connection(self) -> None:
        """The `flwr` CLI's own Flower home: config.toml with one `[superlink.deployment]` connection."""
        home = self.work / "cli"
        home.mkdir(parents=True, exist_ok=True)
        security = f"root-certificates = {toml_string(self.tls.ca)}" if self.tls else "insecure = true"
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "deployment"\n\n[superlink.deployment]\naddress = "{self.address}"\n{security}\n'
        )

    # -- SuperNodes -----------------------------------------------------------------------------------

    def start_supernode(
        self,
        partition: int,
        config_file: Path | None = None,
        isolation: str = "subprocess",
        *,
        node_config: dict[str, str | int | float] | None = None,
    ) -> Node:
        """Start the SuperNode of client `partition`, its ledger and seed under its own state folder.

        `node_config` (a site's own keys: `state-dir`, `site-policy`, `data-path`, ...) replaces the
        default `partition-id`/`config`/`state-dir`; its `state-dir` is then the node's state folder.

        `isolation="subprocess"` (Flower's default): the SuperNode starts its own SuperExec, which
        starts one `flwr-clientapp` process per message. `"process"`: we start that SuperExec
        ourselves (as one would in another container), here in the SuperNode's process group; it
        still starts one `flwr-clientapp` process per message.
        """
        home = self.work / f"node-{partition}"
        if node_config is None:
            assert config_file is not None, "give the node's config file or its whole node_config"
            node_config = {"partition-id": partition, "config": str(config_file), "state-dir": str(home / "state")}
        state = Path(str(node_config["state-dir"]))
        state.mkdir(parents=True, exist_ok=True)
        keys = " ".join(f"{k}={toml_string(v) if isinstance(v, str | Path) else v}" for k, v in node_config.items())
        security = ["--root-certificates", str(self.tls.ca)] if self.tls else ["--insecure"]
        runtime = f"127.0.0.1:{free_port()}"  # its own Runtime API, for its SuperExec and ClientApp processes
        host, port = runtime.split(":")
        command = [
            "flower-supernode", "--superlink", self.address, *security,
            "--host", host, "--port", port, "--isolation", isolation, "--node-config", keys,
        ]  # fmt: skip
        log = self.work / f"node-{partition}.log"
        node = Node(partition, self._spawn(command, home, log), log, state)
        if isolation == "process":
            superexec = ["flower-superexec", "--runtime-api-address", runtime, "--insecure",
                         "--parent-pid", str(node.process.pid)]  # fmt: skip
            self._spawn(superexec, home, log, group=node.process.pid)
        self.nodes.append(node)
        return node

    def wait_for_nodes(self, count: int, timeout: float = 60.0) -> None:
        """Block until `count` SuperNodes logged their node id (registered with the SuperLink)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for node in self.nodes:
                if node.process.poll() is not None:
                    raise RuntimeError(f"SuperNode {node.partition} exited:\n{tail(node.log)}")
            if sum("SuperNode ID:" in node.log.read_text(errors="replace") for node in self.nodes) >= count:
                return
            time.sleep(0.3)
        raise RuntimeError("SuperNodes did not register:\n" + "\n".join(tail(n.log, 10) for n in self.nodes))

    def kill_node(self, node: Node) -> None:
        """SIGKILL a SuperNode's whole process group (SuperNode, its SuperExec, its ClientApp processes)."""
        self._remember()
        try:
            os.killpg(node.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        node.process.wait(timeout=10)

    # -- flwr run -------------------------------------------------------------------------------------

    def flwr_run(self, run_config: dict[str, str | float | int], app: Path | None = None) -> subprocess.Popen[bytes]:
        """Start `flwr run <app> deployment --stream --run-config ...` (default app: the packaged one, written here)."""
        app = app or write_app(self.work / "app")
        overrides = " ".join(f"{k}={toml_string(v) if isinstance(v, str | Path) else v}" for k, v in run_config.items())
        command = ["flwr", "run", str(app), "deployment", "--stream", "--run-config", overrides]
        runner = self._spawn(command, self.work / "cli", self.work / "flwr-run.log")
        self.runners.append(runner)
        return runner

    # -- teardown ----------------------------------------------------------------------------------------

    def _roots(self) -> list[subprocess.Popen[bytes]]:
        return [p for p in [*self.runners, *(n.process for n in self.nodes), self.superlink] if p is not None]

    def _remember(self) -> None:
        """Record every live descendant of what we started (Flower detaches some of its children)."""
        for root in list(self._seen.values()):
            try:
                for child in root.children(recursive=True):
                    self._seen.setdefault(child.pid, child)
            except psutil.NoSuchProcess:
                pass

    def alive(self) -> list[psutil.Process]:
        """Processes we started, or that descend from them, still running (zombies count as gone)."""
        self._remember()
        out = []
        for p in self._seen.values():
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    out.append(p)
            except psutil.NoSuchProcess:
                pass
        return out

    def stop(self, grace: float = 10.0) -> list[psutil.Process]:
        """SIGTERM every process group we own, SIGKILL after `grace` s; return the survivors (should be [])."""
        self._remember()
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            groups = set()
            for p in self.alive():
                try:
                    groups.add(os.getpgid(p.pid))
                except ProcessLookupError:
                    pass
            for group in groups - {os.getpgrp()}:
                try:
                    os.killpg(group, sig)
                except ProcessLookupError:
                    pass
            for p in self.alive():  # a process in pytest's own group (should not happen): by pid
                try:
                    if os.getpgid(p.pid) == os.getpgrp():
                        p.send_signal(sig)
                except (ProcessLookupError, psutil.NoSuchProcess):
                    pass
            psutil.wait_procs(self.alive(), timeout=wait)
            for root in self._roots():  # reap our direct children
                try:
                    root.wait(timeout=0.1)
                except subprocess.TimeoutExpired:
                    pass
            if not self.alive():
                break
        return self.alive()


def tail(path: Path, lines: int = 40) -> str:
    """The last lines of a log."""
    try:
        return f"--- {path.name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"--- {path.name}: (no log)"
