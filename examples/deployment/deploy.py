"""Deploy fedllm across sites with Flower's deployment engine: TLS and SuperNode authentication.

    python deploy.py certs WORK --sites 2 [--host 10.0.0.5]   # CA, SuperLink certificate, a key pair per site
    python deploy.py superlink WORK [--port 9300]              # the SuperLink (TLS, SuperNode auth on)
    python deploy.py register WORK [--superlink HOST:9300]     # register every site's public key
    python deploy.py supernode WORK --site 0 --data site0.jsonl [--superlink HOST:9300]
    python deploy.py run WORK [--superlink HOST:9300] [--run-config "server.num-rounds=2 ..."]
    python deploy.py local WORK --sites 2 --data a.jsonl b.jsonl [--run-config ...]  # all on 127.0.0.1

Everything lives under WORK: certs/ (ca.crt, superlink.crt, superlink.key; ca.key stays with
whoever signs), keys/ (site-N, site-N.pub: EC P-384 in OpenSSH format, what Flower 1.42's
SuperNode authentication takes), flwr-home/ (the `flwr` CLI's connection config), logs/ and runs/.
Checked with flwr 1.42.0. See README.md beside this file for the walkthrough.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import ipaddress
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

from fedllm.errors import FedLLMError
from fedllm.files import Maybe, check, parse_json

ROOT = Path(__file__).resolve().parents[2]  # the fedllm repository: the Flower app that runs
CONNECTION = "fedllm"


def env(work: Path) -> dict[str, str]:
    """The environment Flower's processes need: the venv's bin on PATH (the SuperLink and
    SuperNodes start `flower-superexec` from it), FLWR_HOME in WORK, no dependency installs."""
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
            "FLWR_HOME": str(work / "flwr-home"), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false"}


# --- 1. certificates and keys ------------------------------------------------------------------
def make_certs(work: Path, sites: int, hosts: list[str]) -> None:
    """A CA, the SuperLink's certificate for `hosts` (names or IPs), and one SuperNode key pair
    per site (plus `rogue`, a key nobody registers, for checking that it is refused)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    certs, keys = work / "certs", work / "keys"
    certs.mkdir(parents=True, exist_ok=True)
    keys.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)

    def pem(key) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())

    def cert(subject, issuer, public_key, signer, extensions):
        builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
                   .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=365)))
        for ext, critical in extensions:
            builder = builder.add_extension(ext, critical=critical)
        return builder.sign(signer, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedllm deployment CA")])
    ca = cert(ca_name, ca_name, ca_key.public_key(), ca_key,
              [(x509.BasicConstraints(ca=True, path_length=0), True)])
    link_key = ec.generate_private_key(ec.SECP384R1())
    names = [x509.IPAddress(ipaddress.ip_address(h)) if _is_ip(h) else x509.DNSName(h) for h in hosts]
    link = cert(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]), ca_name, link_key.public_key(), ca_key,
                [(x509.SubjectAlternativeName(names), False), (x509.BasicConstraints(ca=False, path_length=None), True),
                 (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)])
    (certs / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    write_private(certs / "ca.key", pem(ca_key))
    (certs / "superlink.crt").write_bytes(link.public_bytes(serialization.Encoding.PEM))
    write_private(certs / "superlink.key", pem(link_key))
    for name in [f"site-{i}" for i in range(sites)] + ["rogue"]:
        key = ec.generate_private_key(ec.SECP384R1())
        write_private(keys / name, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                                     serialization.NoEncryption()))
        (keys / f"{name}.pub").write_bytes(key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n")


def write_private(path: Path, data: bytes) -> None:
    """Write a private key readable by its owner only from the first byte (created 0600, never
    wider, whatever the umask), replacing any file there."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


# --- 2. processes ------------------------------------------------------------------------------
def superlink_cmd(work: Path, port: int, host: str = "127.0.0.1") -> list[str]:
    certs = (work / "certs").resolve()
    return ["flower-superlink", "--host", host, "--port", str(port),
            "--ssl-ca-certfile", str(certs / "ca.crt"), "--ssl-certfile", str(certs / "superlink.crt"),
            "--ssl-keyfile", str(certs / "superlink.key"), "--enable-supernode-auth",
            "--database", str((work / "superlink.db").resolve())]


def supernode_cmd(work: Path, site: int | str, superlink: str, port: int, data: str = "",
                  extra_config: str = "") -> list[str]:
    key = f"site-{site}" if isinstance(site, int) else site
    config = " ".join(filter(None, [f"partition-id={site if isinstance(site, int) else 0}", 'worker="warm"',
                                    f'data-path="{Path(data).resolve()}"' if data else "", extra_config]))
    return ["flower-supernode", "--superlink", superlink,
            "--root-certificates", str((work / "certs" / "ca.crt").resolve()),
            "--auth-supernode-private-key", str((work / "keys" / key).resolve()),
            "--port", str(port), "--node-config", config]


def write_connection(work: Path, address: str) -> None:
    """The `flwr` CLI's connection to this SuperLink, in WORK/flwr-home/config.toml."""
    home = work / "flwr-home"
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = "{address}"\n'
        f'root-certificates = "{(work / "certs" / "ca.crt").resolve()}"\n')


def flwr(work: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["flwr", *args], env=env(work), capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT)


def flwr_json(proc: subprocess.CompletedProcess, spec: Any, command: str) -> Any:
    """The `flwr COMMAND --format json` answer, read through fedllm's checked path: output that is
    not JSON, or lacks what this script indexes, is one FedLLMError line naming the command."""
    where = f"`flwr {command}`'s output"
    value = parse_json(proc.stdout.strip() or "{}", where)
    check(value, spec, where)
    return value


def register(work: Path) -> list[str]:
    """Register every site's public key with the SuperLink (the CLI talks to its Control API)."""
    done = []
    for pub in sorted((work / "keys").glob("site-*.pub")):
        proc = flwr(work, "supernode", "register", str(pub.resolve()), CONNECTION, "--format", "json")
        try:
            out = flwr_json(proc, {"success": Maybe(bool)}, "supernode register")
        except FedLLMError:
            out = {}
        if not out.get("success", False) and "already in use" not in proc.stdout:
            raise RuntimeError(f"registering {pub.name} failed: {proc.stdout.strip()} {proc.stderr.strip()[-500:]}")
        done.append(pub.stem)
    return done


def online_nodes(work: Path) -> int:
    proc = flwr(work, "supernode", "ls", CONNECTION, "--format", "json")
    try:
        return sum(n.get("status") == "online" for n in flwr_json(proc, {"nodes": [dict]}, "supernode ls")["nodes"])
    except FedLLMError:
        return 0


def submit(work: Path, run_config: str) -> int:
    """`flwr run` the fedllm app on the SuperLink; returns the run id."""
    args = ["run", str(ROOT), CONNECTION, "--format", "json"]
    if run_config:
        args += ["--run-config", run_config]
    proc = flwr(work, *args, timeout=300)
    try:
        return int(flwr_json(proc, {"run-id": (int, str)}, "run")["run-id"])
    except (ValueError, FedLLMError) as err:
        raise RuntimeError(f"flwr run failed: {proc.stdout.strip()[-800:]} {proc.stderr.strip()[-800:]}") from err


def wait_run(work: Path, run_id: int, timeout: float) -> str:
    """Poll until the run finishes; returns Flower's status (e.g. finished:completed)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        proc = flwr(work, "ls", CONNECTION, "--run-id", str(run_id), "--format", "json")
        with contextlib.suppress(FedLLMError, IndexError):
            status = flwr_json(proc, {"runs": [{"status": str}]}, "ls")["runs"][0]["status"]
            if status.startswith("finished"):
                return status
        time.sleep(2)
    raise TimeoutError(f"run {run_id} did not finish within {timeout:.0f} s")


class Processes:
    """Background processes, each in its own process group, stopped together (also on error)."""

    def __init__(self, work: Path) -> None:
        self.work, self.procs = work, {}
        self.port = 0  # the SuperLink's, once local_federation has started it
        (work / "logs").mkdir(parents=True, exist_ok=True)

    def start(self, name: str, cmd: list[str], threads: int = 0) -> subprocess.Popen:
        """Start `cmd`; `threads` > 0 caps its torch/OpenMP threads (sites sharing one machine)."""
        log = open(self.work / "logs" / f"{name}.log", "w")
        extra = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)} if threads else {}
        proc = subprocess.Popen(cmd, env={**env(self.work), **extra}, stdout=log, stderr=subprocess.STDOUT,
                                cwd=self.work, start_new_session=True)
        log.close()
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        return (self.work / "logs" / f"{name}.log").read_text(errors="replace")

    def wait_for(self, name: str, text: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log(name):
            if self.procs[name].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start: {self.log(name)[-1500:]}")
            time.sleep(0.2)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def local_federation(work: Path, sites: int, data: list[str] | None = None,
                     extra_config: str = "") -> Iterator[Processes]:
    """A SuperLink and `sites` registered SuperNodes on 127.0.0.1 (free ports), all stopped on
    exit; certificates and keys are made first when WORK has none."""
    if not (work / "certs" / "ca.crt").exists():
        make_certs(work, sites, ["127.0.0.1", "localhost"])
    port = free_port()
    procs = Processes(work)
    try:
        procs.start("superlink", superlink_cmd(work, port))
        procs.wait_for("superlink", "Uvicorn running on https")
        write_connection(work, f"127.0.0.1:{port}")
        register(work)
        threads = max(1, (os.cpu_count() or 1) // sites)  # the sites share this machine's cores
        for i in range(sites):
            procs.start(f"site-{i}", supernode_cmd(work, i, f"127.0.0.1:{port}", free_port(),
                                                   (data or [""] * sites)[i], extra_config), threads)
        deadline = time.monotonic() + 90
        while online_nodes(work) < sites:
            if time.monotonic() > deadline:
                raise RuntimeError("SuperNodes did not come online: " + procs.log("site-0")[-1500:])
            time.sleep(0.5)
        procs.port = port
        yield procs
    finally:
        procs.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("certs", help="CA, SuperLink certificate, one SuperNode key pair per site")
    p.add_argument("--sites", type=int, default=2)
    p.add_argument("--host", action="append", default=[], help="the SuperLink's name or IP (repeatable)")
    p = sub.add_parser("superlink", help="start the SuperLink with TLS and SuperNode authentication")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9300)
    p = sub.add_parser("register", help="register every site's public key with the SuperLink")
    p.add_argument("--superlink", default="127.0.0.1:9300")
    p = sub.add_parser("supernode", help="start one site's SuperNode")
    p.add_argument("--site", type=int, required=True)
    p.add_argument("--superlink", default="127.0.0.1:9300")
    p.add_argument("--port", type=int, default=0, help="the node's local Runtime API port (0: a free one)")
    p.add_argument("--data", default="", help="this site's data file (JSON/JSONL/CSV/Parquet)")
    p = sub.add_parser("run", help="run fedllm on the federation and wait for it")
    p.add_argument("--superlink", default="127.0.0.1:9300")
    p.add_argument("--run-config", default="")
    p.add_argument("--timeout", type=float, default=3600)
    p = sub.add_parser("local", help="all of the above on 127.0.0.1, then stop everything")
    p.add_argument("--sites", type=int, default=2)
    p.add_argument("--data", nargs="*", default=[])
    p.add_argument("--run-config", default="")
    p.add_argument("--timeout", type=float, default=3600)
    for sp in sub.choices.values():
        sp.add_argument("work", type=Path, help="working directory (certs/, keys/, flwr-home/, logs/, runs/)")
    args = parser.parse_args()
    work = args.work.resolve()
    if args.command == "certs":
        make_certs(work, args.sites, args.host or ["127.0.0.1", "localhost"])
        print(f"wrote {work / 'certs'} and {work / 'keys'}")
    elif args.command == "superlink":
        os.execvpe("flower-superlink", superlink_cmd(work, args.port, args.host), env(work))
    elif args.command == "register":
        write_connection(work, args.superlink)
        print("registered:", ", ".join(register(work)))
    elif args.command == "supernode":
        os.execvpe("flower-supernode", supernode_cmd(work, args.site, args.superlink, args.port or free_port(),
                                                     args.data), env(work))
    elif args.command == "run":
        write_connection(work, args.superlink)
        return finish(work, submit(work, with_run_dir(work, args.run_config)), args.timeout)
    else:
        if args.data and len(args.data) != args.sites:
            parser.error(f"--data: {len(args.data)} files for {args.sites} sites")
        with local_federation(work, args.sites, args.data):
            return finish(work, submit(work, with_run_dir(work, args.run_config)), args.timeout)
    return 0


def with_run_dir(work: Path, run_config: str) -> str:
    """The run directory goes to WORK/runs unless the run config names one (the ServerApp
    process writes it, on the SuperLink's machine)."""
    return run_config if "server.run-dir" in run_config else f'{run_config} server.run-dir="{work / "runs"}"'.strip()


def finish(work: Path, run_id: int, timeout: float) -> int:
    status = wait_run(work, run_id, timeout)
    print(flwr(work, "log", str(run_id), CONNECTION, "--show").stdout[-4000:])
    print(f"run {run_id}: {status}; run directories under {work / 'runs'}")
    return 0 if status == "finished:completed" else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (FedLLMError, RuntimeError, TimeoutError) as err:  # one line, as fedllm's own commands
        print(f"deploy.py: error: {err}", file=sys.stderr)
        sys.exit(2)
