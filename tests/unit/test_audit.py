"""The recording audit hook, in a child interpreter (a hook cannot be removed once installed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from zimage_backend import audit

# What the security test must be able to see: a file written, a process, code compiled from a
# string, a connection. The port is closed; the event comes before the attempt.
CHILD = """
import os, socket, sys
from zimage_backend import audit
print(audit.install_from_env())
open(sys.argv[1], "w").close()
os.system("true")
eval("6 * 7")
try:
    socket.create_connection(("127.0.0.1", 9), timeout=1)
except OSError:
    pass
"""


def run_child(tmp_path, env_record: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != audit.AUDIT_ENV}
    if env_record is not None:
        env[audit.AUDIT_ENV] = env_record
    done = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "written.txt")],
                          env=env, capture_output=True, text=True, timeout=60, check=True)
    return done.stdout.strip()


def test_the_hook_records_files_processes_code_and_connections(tmp_path):
    record = tmp_path / "audit.jsonl"
    assert run_child(tmp_path, str(record)) == "True"
    events = [json.loads(line) for line in record.read_text().splitlines()]
    seen = {(e["event"], e["args"][0]) for e in events}
    assert ("open", str(tmp_path / "written.txt")) in seen
    assert ("os.system", "true") in seen
    assert ("compile", "6 * 7") in seen
    assert any(e["event"] == "socket.connect" and "127.0.0.1" in e["args"][1] for e in events)
    # Its own writes to the record raise no events of their own.
    assert not any(e["event"] == "open" and e["args"][0] == str(record) for e in events)
    assert {e["pid"] for e in events} == {events[0]["pid"]}


def test_off_without_the_variable(tmp_path):
    assert run_child(tmp_path, None) == "False"
    assert list(tmp_path.iterdir()) == [tmp_path / "written.txt"]
