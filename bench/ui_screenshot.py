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
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.local_services import registered, start_service, stop
from services.client import ServiceClient
from services.processes import free_port

DEPLOYMENT = "pipeline/distillery"
# Headless and quiet: no GPU, no sandbox (we run as root in a container), nothing fetched in the background.
# --run-all-compositor-stages-before-draw: without it the shot often catches the page mid fade-in, dimmed
# (2 of 3 shots; 0 of 7 with it).
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
                  "--run-all-compositor-stages-before-draw")


def deployment_id(api_url: str) -> str:
    """The id of the pipeline deployment (the server knows it: ``registered``)."""
    api = ServiceClient(api_url, timeout_s=10)
    try:
        return api.get(f"/deployments/name/{DEPLOYMENT}")["id"]
    finally:
        api.close()


def screenshot(chromium: str, url: str, out: Path, width: int, height: int, budget_ms: int) -> None:
    """Load ``url`` and save a ``width``×``height`` PNG once the page's scripts had ``budget_ms`` to render."""
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        command = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}",
                   f"--virtual-time-budget={budget_ms}", f"--screenshot={out.resolve()}", url]
        result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    if result.returncode != 0 or not out.is_file():
        raise RuntimeError(f"chromium failed ({result.returncode}): {result.stderr[-2000:]}")


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
            port = free_port()
            server = start_service([sys.executable, "-m", "flows.cli", "--home", str(Path(workdir) / "home"),
                                    "server", "--port", str(port), "--no-schedule"], Path(workdir) / "server.log")
            api_url = f"http://127.0.0.1:{port}/api"
            server.wait_until(lambda: registered(api_url, DEPLOYMENT), 600, what=f"register {DEPLOYMENT}",
                              interval_s=2.0)
        deployment = deployment_id(api_url)
        ready = time.monotonic()
        url = f"{api_url.removesuffix('/api')}/deployments/deployment/{deployment}/run"
        screenshot(args.chromium, url, args.out, width, height, args.render_ms)
        shot = time.monotonic()
    finally:
        if server is not None:
            stop(server, timeout_s=90)  # SIGTERM: the server stops its children; SIGKILL what is left
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"page:       {url}")
    print(f"screenshot: {args.out} ({args.out.stat().st_size} bytes, {width}x{height})")
    print(f"server ready with deployments: {ready - started:.1f} s; screenshot: {shot - ready:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
