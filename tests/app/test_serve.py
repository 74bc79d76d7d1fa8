"""`phenoscreen dashboard` is the server process: a signal to its PID stops it."""

import signal
import socket
import subprocess
import sys

from pipeline.cli import main
from tests.app.test_browser import _wait_healthy
from tests.conftest import free_port
from tests.pipeline.test_hit_designs import make_screen


def test_killing_the_dashboard_by_its_pid_stops_the_server(tmp_path):
    path = tmp_path / "screen.csv"
    make_screen().to_csv(path, index=False)
    url = f"sqlite:///{tmp_path}/s.db"
    assert main(["import-profiles", str(path), "--db", url]) == 0
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "dashboard", "--db", url,
         "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        _wait_healthy(port, process)
        process.send_signal(signal.SIGTERM)  # as `kill PID` does
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    # the PID was the server: with it gone, nothing listens on the port any more
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0
    assert b"PhenoScreen dashboard on" in process.stdout.read()
