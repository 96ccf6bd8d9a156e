"""A loopback sshd standing in for a device (the ssh benchmark runner's tests), run as one of the stack's
background processes (:mod:`tasks.stack.processes`: pid file, log, stopped with ``stop("sshd", run_dir)``)."""

from __future__ import annotations

import getpass
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tasks.stack.processes import ServiceError, start, wait_listening


@dataclass(frozen=True)
class SshTarget:
    """A loopback sshd standing in for a device: where it listens and the files a client needs."""

    host: str
    port: int
    user: str
    client_key: Path
    known_hosts: Path


SSHD_CONFIG = """Port {port}
ListenAddress {address}
HostKey {host_key}
PidFile {pid_file}
AuthorizedKeysFile {authorized_keys}
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
UsePAM no
StrictModes no
Subsystem sftp internal-sftp
"""


def _keys(root: Path, keygen: str, port: int, address: str) -> tuple[Path, Path, Path]:
    """A host key, a client key allowed to log in, and a known_hosts file holding the host key."""
    host_key, client_key = root / "ssh_host_ed25519_key", root / "client_ed25519"
    for key in (host_key, client_key):
        if not key.is_file():
            subprocess.run([keygen, "-q", "-t", "ed25519", "-N", "", "-C", key.name, "-f", str(key)], check=True,
                           capture_output=True)
    (root / "authorized_keys").write_text(client_key.with_suffix(".pub").read_text())
    (root / "authorized_keys").chmod(0o600)
    algorithm, public = host_key.with_suffix(".pub").read_text().split()[:2]
    known_hosts = root / "known_hosts"
    known_hosts.write_text(f"[{address}]:{port} {algorithm} {public}\n")
    return host_key, client_key, known_hosts


def start_sshd(run_dir: Path, port: int, timeout_s: float = 20.0, address: str = "127.0.0.1") -> SshTarget:
    """Debian's sshd on ``address`` (loopback) with its own generated host key, a client key allowed for the
    current user, key authentication only, and a known_hosts file holding its host key (so clients verify it)."""
    search = f"{os.environ.get('PATH', '')}{os.pathsep}/usr/sbin{os.pathsep}/sbin"
    sshd, keygen = shutil.which("sshd", path=search), shutil.which("ssh-keygen", path=search)
    if sshd is None or keygen is None:
        raise ServiceError("sshd or ssh-keygen is missing: apt-get install openssh-server")
    root = run_dir / "sshd"
    root.mkdir(parents=True, exist_ok=True)
    host_key, client_key, known_hosts = _keys(root, keygen, port, address)
    config = root / "sshd_config"
    config.write_text(SSHD_CONFIG.format(port=port, address=address, host_key=host_key, pid_file=root / "sshd.pid",
                                         authorized_keys=root / "authorized_keys"))
    Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # sshd's privilege separation directory
    service = start("sshd", [sshd, "-D", "-e", "-f", str(config)], run_dir, {}, None, f"{address}:{port}")
    wait_listening("sshd", run_dir, service, port, timeout_s)
    return SshTarget(address, port, getpass.getuser(), client_key, known_hosts)
