"""README's curl example, run as written against the real server: it must leave a PNG behind."""

from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess

import pytest

from tests.conftest import ROOT
from tests.e2e.helpers import image_size

pytestmark = pytest.mark.e2e


def _curl_block() -> str:
    """The one shell block of README's "HTTP/JSON with curl" section."""
    section = re.search(r"^### HTTP/JSON with curl\n(.*?)^#", (ROOT / "README.md").read_text(),
                        re.MULTILINE | re.DOTALL)
    assert section, "README has no 'HTTP/JSON with curl' section"
    blocks = re.findall(r"^```bash\n(.*?)^```", section.group(1), re.MULTILINE | re.DOTALL)
    assert len(blocks) == 1, blocks
    return blocks[0]


@pytest.mark.skipif(shutil.which("curl") is None, reason="README's example needs curl")
def test_readme_curl_example_writes_a_png(server, tmp_path):
    script = _curl_block()
    assert "http://localhost:8000/" in script
    script = script.replace("http://localhost:8000/", f"http://{server.http_url}/")
    run = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path,
                         capture_output=True, timeout=300)
    assert run.returncode == 0, run.stderr.decode(errors="replace")

    # What the example printed is the JSON part of the answer, naming the seed it asked for.
    answer = json.loads(run.stdout)
    outputs = {o["name"]: o for o in answer["outputs"]}
    assert outputs["SEED"]["data"] == [42]
    image = outputs["IMAGE"]
    assert image["datatype"] == "BYTES" and image["shape"] == [1, 1]

    png = (tmp_path / "fox.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    assert image_size(png) == ("PNG", (1024, 1024))  # the server's default size, fully decoded
    # The file is exactly the one BYTES element that follows the JSON: its length prefix says so.
    body = (tmp_path / "answer.bin").read_bytes()
    (length,) = struct.unpack_from("<I", body, len(body) - len(png) - 4)
    assert length == len(png) == image["parameters"]["binary_data_size"] - 4
