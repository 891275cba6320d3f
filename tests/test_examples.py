"""The examples' helpers that run without a federation: deploy.py's certificates and keys."""

from __future__ import annotations

import importlib.util
import os
import stat
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_deploy_writes_private_keys_owner_only_whatever_the_umask(tmp_path):
    spec = importlib.util.spec_from_file_location("deploy", ROOT / "examples" / "deployment" / "deploy.py")
    deploy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(deploy)
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "site-0").write_text("an old, world-readable key")
    os.chmod(tmp_path / "keys" / "site-0", 0o644)
    old = os.umask(0)
    try:
        deploy.make_certs(tmp_path, 2, ["127.0.0.1"])
    finally:
        os.umask(old)
    private = [tmp_path / "certs" / "ca.key", tmp_path / "certs" / "superlink.key",
               *(tmp_path / "keys" / n for n in ("site-0", "site-1", "rogue"))]
    assert all(stat.S_IMODE(os.stat(p).st_mode) == 0o600 for p in private)
    assert (tmp_path / "keys" / "site-0").read_bytes().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
    assert stat.S_IMODE(os.stat(tmp_path / "certs" / "ca.crt").st_mode) & 0o044  # certificates stay readable
