"""What the server keeps and writes about a user: no request text in any log (Gradio's and
pydantic's error paths included), and uploads, previews and report drafts deleted when the
session ends and, after a crash, when the next server starts."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import httpx
import pytest

from serve.logs import RedactingFormatter, exception_summary
from serve.session_files import private_folder
from tests.serve_fixtures import TIMEOUT, png_bytes, serving, wait_until

PHI = "Patient Doe^Jane, MRN-12345"


@pytest.fixture(scope="module")
def ui(taught_model):
    from serve.app import build_app
    from serve.engine import Engine

    with serving(Engine(taught_model, name="demo"), build_app) as server:
        yield server


def test_a_gradio_validation_error_logs_no_request_text(ui, capfd, caplog):
    """pydantic's message quotes the input ("input_value='Patient Doe^Jane...'"); Gradio prints
    it with traceback.print_exc(). Neither the log nor stderr may carry it."""
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    client = Client(ui.url + "/", verbose=False, download_files=False)
    caplog.set_level(logging.DEBUG)
    for history in (PHI, [[PHI]], [{"role": "user", "content": PHI, "metadata": 5}]):
        with pytest.raises(AppError):
            client.predict(PHI, history, None, "auto/file", 0, 8, 0, api_name="/chat")
    out, err = capfd.readouterr()
    assert "ValidationError" in caplog.text + err, "the failure itself is still logged"
    for text in (caplog.text, out, err):
        assert "Doe" not in text and "MRN" not in text


def test_logged_exceptions_keep_their_type_and_frames_but_not_their_message():
    try:
        try:
            raise KeyError(PHI)
        except KeyError as inner:
            raise ValueError(f"bad value {PHI}") from inner
    except ValueError as e:
        summary = exception_summary(e)
        record = logging.LogRecord("medvlm", logging.ERROR, __file__, 1, "failed on %s", (PHI,), (type(e), e, None))
    assert "ValueError" in summary and "KeyError" in summary and "test_serve_privacy.py" in summary
    assert "Doe" not in summary
    record.name = "gradio.routes"  # a library's log call with an argument: shown as its template only
    text = RedactingFormatter("%(name)s %(message)s").format(record)
    assert "failed on %s" in text and "Doe" not in text and "ValueError" in text


def test_uploads_and_previews_are_deleted_when_the_session_ends(ui, tmp_path):
    from gradio_client import Client, handle_file

    client = Client(ui.url + "/", verbose=False, download_files=False)
    png = tmp_path / "scan.png"
    png.write_bytes(png_bytes(11, size=80))
    with httpx.stream("GET", f"{ui.url}/gradio_api/heartbeat/{client.session_hash}", timeout=TIMEOUT) as beat:
        lines = beat.iter_lines()  # kept: a dropped iterator would close the stream at once
        next(lines)  # the session is alive, as a browser tab's is
        client.predict(handle_file(png), "auto/file", api_name="/upload")
        study, findings, _ = client.predict(handle_file(png), "auto/file", 0, 32, api_name="/draft_report")
        client.predict(findings, "An impression.", api_name="/export_report")
        folder = f"ui-{client.session_hash}"
        handlers_files = _session_files(ui, folder)
        assert len(handlers_files) >= 3 and all(os.path.exists(p) for p in handlers_files)
        assert ui.engine.images(folder)
    # The tab is closed: Gradio runs the unload event, which deletes the session's files.
    assert wait_until(lambda: not any(os.path.exists(p) for p in handlers_files), TIMEOUT)
    assert not ui.engine.images(folder)


def _session_files(server, cid: str) -> list[str]:
    """The files the UI wrote for conversation `cid`: its uploads, previews and report drafts."""
    return sorted(server.config.app.state.ui.files.get(cid, set()))


def test_a_session_s_files_are_served_to_its_browser_only(ui, tmp_path):
    """Gradio serves its cache to anyone with a URL; here an upload, its preview and a report
    draft reach only the client whose cookie they were made for."""
    from gradio_client import Client, handle_file

    owner = Client(ui.url + "/", verbose=False, download_files=False)
    other = Client(ui.url + "/", verbose=False, download_files=False)
    assert owner.cookies.get("medvlm_files") and owner.cookies != other.cookies
    png = tmp_path / "private.png"
    png.write_bytes(png_bytes(12, size=80))
    preview, *_ = owner.predict(handle_file(png), "auto/file", api_name="/upload")
    draft = owner.predict("Findings.", "Impression.", api_name="/export_report")["value"]
    upload = next(p for p in _session_files(ui, f"ui-{owner.session_hash}") if p.endswith("private.png"))
    urls = [preview["url"], draft["url"], f"{ui.url}/gradio_api/file={upload}"]
    for url in urls:
        assert httpx.get(url, cookies=owner.cookies, timeout=TIMEOUT).status_code == 200
        assert httpx.get(url, cookies=other.cookies, timeout=TIMEOUT).status_code == 404
        assert httpx.get(url, timeout=TIMEOUT).status_code == 404
        assert httpx.get(url, cookies={"medvlm_files": "guessed"}, timeout=TIMEOUT).status_code == 404
    owner.close()
    other.close()


def test_left_overs_of_a_crashed_server_are_removed_at_start_up(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)  # a process that has exited: its folders are left-overs
    mine = private_folder("uploads")
    stale = mine.parent / f"{pid}-deadbeef"
    stale.mkdir()
    (stale / "scan.dcm").write_bytes(b"patient data")
    fresh = private_folder("uploads")
    assert not stale.exists() and mine.exists() and fresh.exists() and fresh != mine
    assert oct(mine.stat().st_mode & 0o777) == "0o700"
