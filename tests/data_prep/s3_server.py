"""A moto S3 server on loopback for the object-store tests (imported, not a test).

The server runs in a subprocess of its own (``python -m moto.server``), so the jobs under test, which
are subprocesses too, reach it the way they would reach a real S3-compatible store: over HTTP at an
endpoint URL, with credentials from the environment.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

HOST = "127.0.0.1"
START_TIMEOUT = 30.0


def free_port() -> int:
    """A TCP port free on loopback now (the server binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def s3_env(endpoint: str, home: Path) -> dict[str, str]:
    """Environment variables that point boto3 / s3fs at ``endpoint`` and at nothing else.

    Dummy credentials; the endpoint both as fsspec's config variable (``FSSPEC_S3_ENDPOINT_URL``
    becomes ``endpoint_url=`` of every ``S3FileSystem``) and as botocore's (``AWS_ENDPOINT_URL_S3``);
    no AWS config files, no instance metadata lookups, and no proxy for loopback.
    """
    return {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "FSSPEC_S3_ENDPOINT_URL": endpoint,
        "AWS_ENDPOINT_URL_S3": endpoint,
        "AWS_CONFIG_FILE": str(home / "aws-config-absent"),
        "AWS_SHARED_CREDENTIALS_FILE": str(home / "aws-credentials-absent"),
        "AWS_EC2_METADATA_DISABLED": "true",
        "NO_PROXY": f"{HOST},localhost",
        "no_proxy": f"{HOST},localhost",
    }


def _answers(endpoint: str) -> bool:
    """Whether the server answers HTTP at ``endpoint`` (asked directly, never through a proxy)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"{endpoint}/moto-api/", timeout=1) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


class MotoServer:
    """``python -m moto.server`` on ``HOST`` at a free port; its output goes to ``log``."""

    def __init__(self, log: Path):
        self.log = log
        self.port = free_port()
        self.endpoint = f"http://{HOST}:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        """Start the server and wait (at most ``START_TIMEOUT`` s) until it answers HTTP."""
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(self.port)],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT
        while not _answers(self.endpoint):
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto server exited with status {self.proc.returncode} before answering "
                                   f"at {self.endpoint}:\n{self.log_text()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"moto server did not answer at {self.endpoint} within {START_TIMEOUT:.0f} s:\n"
                                   f"{self.log_text()}")
            time.sleep(0.1)

    def stop(self) -> None:
        """Terminate the server (its process group), killing it if it lingers."""
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        except ProcessLookupError:
            pass

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""
