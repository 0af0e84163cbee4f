"""The server's defences as units: the streaming stop matcher against a brute-force search, supervisor detection,
the repeated-log filter, the connection-limit default, the API-key checks of the CLI, and a model that fails to load
under a supervisor (a real `trt-gemma serve` process)."""
from __future__ import annotations

import logging
import random
import shutil
import time

import httpx
import pytest
from click.testing import CliRunner

from live_server import ServerProcess, served_checkpoint  # noqa: F401 (fixture)
from trt_gemma.cli import cli
from trt_gemma.errors import ConfigError
from trt_gemma.serve.conn import RepeatFilter, default_max_connections, supervisor
from trt_gemma.runtime.stops import StopMatcher


def brute_force(text: str, stops: list[str]) -> tuple[str, bool]:
    """The text up to the first stop string (by where it ends; the longest if several end there), by scanning every
    prefix of the whole text: quadratic, obviously right."""
    for end in range(1, len(text) + 1):
        hits = [s for s in stops if text[:end].endswith(s)]
        if hits:
            return text[:end - max(map(len, hits))], True
    return text, False


@pytest.mark.parametrize("alphabet", ["ab", "abc", "a\u00e9\U0001f98a"])
def test_stop_matcher_equals_brute_force_for_any_split_of_the_text(alphabet):
    rng = random.Random(len(alphabet))
    for _ in range(1500):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 6))) for _ in range(rng.randint(1, 4))]
        m, out, stopped, i = StopMatcher(stops), [], False, 0
        while i < len(text) and not stopped:
            n = rng.randint(0, 5)
            piece, stopped = m.push(text[i:i + n])
            out.append(piece)
            i += n
        if not stopped:
            out.append(m.flush())
        assert ("".join(out), stopped) == brute_force(text, stops), (text, stops, out)


def test_stop_matcher_withholds_only_a_possible_stop_prefix():
    m = StopMatcher(["<end>", "xyz"])
    assert m.push("hello <e") == ("hello ", False)  # "<e" may begin "<end>"
    assert m.push("nd") == ("", False)
    assert m.push("x!") == ("<endx!", False)  # it did not: all of it goes out
    assert m.push("ab<end>cd") == ("ab", True)


def test_supervisor_detection(tmp_path):
    assert supervisor({}, tmp_path) is None
    assert "systemd" in supervisor({"INVOCATION_ID": "0123abcd"}, tmp_path)
    assert "Kubernetes" in supervisor({"KUBERNETES_SERVICE_HOST": "10.0.0.1"}, tmp_path)
    assert "container" in supervisor({"container": "podman"}, tmp_path)
    assert supervisor({"INVOCATION_ID": ""}, tmp_path) is None  # set but empty: not systemd's
    (tmp_path / ".dockerenv").touch()
    assert "Docker" in supervisor({}, tmp_path)
    (tmp_path / ".dockerenv").unlink()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".containerenv").touch()
    assert "Podman" in supervisor({}, tmp_path)


def test_connection_limit_default_leaves_room_in_the_file_limit():
    assert default_max_connections(256) == 192
    assert default_max_connections(1024) == 960
    assert default_max_connections(1 << 20) == 1024
    assert default_max_connections(40) == 8


def test_repeated_log_lines_are_collapsed():
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    logger = logging.getLogger("trt_gemma.test_repeat")
    logger.propagate = False
    logger.addHandler(Keep())
    logger.addFilter(RepeatFilter(interval=0.2))
    for i in range(1000):
        logger.error("accept failed: Too many open files (fd %d)", i)
    logger.error("another kind")
    assert records == ["accept failed: Too many open files (fd 0)", "another kind"]
    time.sleep(0.25)
    logger.error("accept failed: Too many open files (fd %d)", 1000)
    assert records[-1] == "accept failed: Too many open files (fd 1000) (999 more like this in the last 0 s)"


def test_cli_refuses_an_empty_api_key_and_documents_the_variable(tmp_path):
    runner = CliRunner()
    for args, env in ((["serve", "x"], {"TRT_GEMMA_API_KEY": ""}), (["serve", "x", "--api-key", "  "], {})):
        r = runner.invoke(cli, args, env=env)
        assert isinstance(r.exception, ConfigError) and "empty" in r.exception.message, (args, r.output)
    empty = tmp_path / "key"
    empty.write_text("\n")
    r = runner.invoke(cli, ["serve", "x", "--api-key-file", str(empty)], env={"TRT_GEMMA_API_KEY": None})
    assert isinstance(r.exception, ConfigError) and str(empty) in r.exception.message
    r = runner.invoke(cli, ["serve", "--help"])
    assert "TRT_GEMMA_API_KEY" in r.output and "--api-key-file" in r.output


def _broken_checkpoint(ckpt, tmp_path):
    bad = tmp_path / "broken-ckpt"
    shutil.copytree(ckpt, bad)
    for f in bad.glob("rank*.safetensors"):
        f.write_bytes(f.read_bytes()[:100])  # truncated: the header promises bytes that are not there
    return bad


def test_a_model_that_fails_to_load_under_systemd_exits_nonzero(served_checkpoint, tmp_path):
    bad = _broken_checkpoint(served_checkpoint, tmp_path)
    p = ServerProcess([str(bad)], tmp_path / "exit.log", env={"INVOCATION_ID": "0123abcd"}).start()
    try:
        rc = p.proc.wait(timeout=90)
    finally:
        p.stop()
    out = p.output()
    assert rc != 0 and "error:" in out and "Traceback" not in out, (rc, out[-2000:])


def test_without_a_supervisor_the_failed_server_stays_up_with_503(served_checkpoint, tmp_path):
    bad = _broken_checkpoint(served_checkpoint, tmp_path)
    p = ServerProcess([str(bad), "--no-exit-on-load-failure"], tmp_path / "stay.log",
                      env={"INVOCATION_ID": "0123abcd"}).start()
    try:
        deadline = time.monotonic() + 90
        while True:
            assert p.proc.poll() is None, p.output()[-2000:]
            try:
                r = httpx.get(p.url + "/health", timeout=2)
                if "Backend failed" in r.text:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, p.output()[-2000:]
            time.sleep(0.1)
        assert r.status_code == 503
    finally:
        p.stop()


def test_a_backend_that_fails_its_probe_calls_on_failure(served_checkpoint):
    """The other half of --exit-on-load-failure: after an unexpected error the one-token probe fails too, and the
    app reports it to run_server's hook (which stops uvicorn) instead of only turning /health to 503."""
    import threading

    from live_server import LiveServer
    from trt_gemma.runtime.reference import ReferenceBackend
    from trt_gemma.serve.app import create_app

    class DeadBackend(ReferenceBackend):
        def stream(self, prompt_ids, params, cancel=lambda: False):
            raise RuntimeError("device lost")

    failed, seen = threading.Event(), []
    b = DeadBackend.load(served_checkpoint, slots=1)
    with LiveServer(create_app(b, "m", on_failure=lambda e: (seen.append(e), failed.set()))) as s:
        r = httpx.post(s.url + "/v1/completions", json={"model": "m", "prompt": "x", "max_tokens": 2}, timeout=60)
        assert r.status_code == 500
        assert failed.wait(20), "on_failure was not called after the probe failed"
        assert isinstance(seen[0], RuntimeError) and httpx.get(s.url + "/health").status_code == 503
