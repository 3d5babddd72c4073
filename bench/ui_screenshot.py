"""Screenshot of the Prefect UI's run form for the pipeline deployment, taken in headless Chromium.

Starts ``distillery server`` on a free loopback port with a temporary artifact root (or uses the server
of ``--api-url``), waits for the ``pipeline/distillery`` deployment, opens its custom-run page (the
parameter form: the profile, the knobs, then the full ``PipelineConfig``, see ``flows.pipeline``) and
saves a PNG. Prints how long each part took. Needs Debian's ``chromium`` (``apt-get install -y chromium``).

    python bench/ui_screenshot.py --out prefect-pipeline-form.png
    python bench/ui_screenshot.py --api-url http://127.0.0.1:4200/api --out form.png
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DEPLOYMENT = "pipeline/distillery"
# Headless and quiet: no GPU, no sandbox (we run as root in a container), nothing fetched in the background.
# --run-all-compositor-stages-before-draw: without it the shot often catches the page mid fade-in, dimmed
# (2 of 3 shots; 0 of 7 with it).
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
                  "--run-all-compositor-stages-before-draw")


def deployment_id(api_url: str, timeout_s: float, server: subprocess.Popen | None) -> str:
    """The id of the pipeline deployment once the server knows it."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server is not None and server.poll() is not None:
            raise RuntimeError(f"distillery server exited with code {server.returncode}")
        try:
            with urllib.request.urlopen(f"{api_url}/deployments/name/{DEPLOYMENT}", timeout=10) as response:
                return json.load(response)["id"]
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(2)
    raise RuntimeError(f"{DEPLOYMENT} not registered at {api_url} within {timeout_s:.0f} s")


def screenshot(chromium: str, url: str, out: Path, width: int, height: int, budget_ms: int) -> None:
    """Load ``url`` and save a ``width``×``height`` PNG once the page's scripts had ``budget_ms`` to render."""
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        command = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}",
                   f"--virtual-time-budget={budget_ms}", f"--screenshot={out.resolve()}", url]
        result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    if result.returncode != 0 or not out.is_file():
        raise RuntimeError(f"chromium failed ({result.returncode}): {result.stderr[-2000:]}")


def start_server(home: Path, port: int, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "flows.cli", "--home", str(home), "server", "--port", str(port),
               "--no-schedule"]
    with open(log, "wb") as out:
        return subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def stop_server(server: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (it stops its children), SIGKILL what is left after 90 s."""
    try:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
    except ProcessLookupError:
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("prefect-pipeline-form.png"), help="PNG to write")
    parser.add_argument("--api-url", help="a running server's API (default: start `distillery server`)")
    parser.add_argument("--chromium", default="chromium", help="Chromium executable")
    parser.add_argument("--size", default="1200x1480", help="window size WIDTHxHEIGHT in pixels (the form fits)")
    parser.add_argument("--render-ms", type=int, default=30000, help="virtual time the page gets to render")
    args = parser.parse_args(argv)
    if shutil.which(args.chromium) is None:
        print(f"error: {args.chromium} not found (apt-get install -y chromium)", file=sys.stderr)
        return 2
    width, height = (int(v) for v in args.size.split("x"))
    started = time.monotonic()
    server, workdir = None, tempfile.mkdtemp(prefix="ui-screenshot-")
    try:
        api_url = args.api_url
        if api_url is None:
            from flows.server import free_port

            port = free_port()
            server = start_server(Path(workdir) / "home", port, Path(workdir) / "server.log")
            api_url = f"http://127.0.0.1:{port}/api"
        deployment = deployment_id(api_url, timeout_s=600, server=server)
        ready = time.monotonic()
        url = f"{api_url.removesuffix('/api')}/deployments/deployment/{deployment}/run"
        screenshot(args.chromium, url, args.out, width, height, args.render_ms)
        shot = time.monotonic()
    finally:
        if server is not None:
            stop_server(server)
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"page:       {url}")
    print(f"screenshot: {args.out} ({args.out.stat().st_size} bytes, {width}x{height})")
    print(f"server ready with deployments: {ready - started:.1f} s; screenshot: {shot - ready:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
