"""One transfer against a real HTTP server on 127.0.0.1: resume, retries, errors, offline."""

from __future__ import annotations

import os
import socket

import pytest

from rmt.errors import DownloadError, ZooError
from rmt.zoo.transfer import TransferOptions, fetch

PAYLOAD = os.urandom(3 << 20)  # 3 MiB: several read chunks
QUICK = TransferOptions(timeout_s=10, retries=2, backoff_s=0)


def _partial(tmp_path):
    return tmp_path / "partial" / "file.incomplete"


def test_plain_transfer_reports_progress(zoo_server, tmp_path):
    url = zoo_server.add("f.bin", PAYLOAD)
    seen = []
    size = fetch(url, _partial(tmp_path), options=QUICK, progress=lambda done, total: seen.append((done, total)))
    assert size == len(PAYLOAD) and _partial(tmp_path).read_bytes() == PAYLOAD
    assert seen[0] == (0, len(PAYLOAD)) and seen[-1] == (len(PAYLOAD), len(PAYLOAD))
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_a_dropped_connection_resumes_with_range(zoo_server, tmp_path):
    url = zoo_server.add("f.bin", PAYLOAD, mode="drop-once")
    notes = []
    fetch(url, _partial(tmp_path), options=QUICK, notify=notes.append)
    assert _partial(tmp_path).read_bytes() == PAYLOAD
    (first, range1, _), (_, range2, if_range) = zoo_server.gets("f.bin")
    assert range1 is None and range2 == f"bytes={len(PAYLOAD) // 2}-"
    assert if_range == zoo_server.etag(PAYLOAD)  # only the same file may be resumed
    assert any("closed after" in n and "retrying" in n for n in notes)
    assert any("resuming at" in n for n in notes)


def test_spent_retries_keep_the_bytes_and_a_later_run_resumes(zoo_server, tmp_path):
    url = zoo_server.add("f.bin", PAYLOAD, mode="drop")
    with pytest.raises(DownloadError) as e:
        fetch(url, _partial(tmp_path), options=QUICK)
    assert e.value.resumable and "after 3 attempts" in str(e.value) and "run the same command again" in str(e.value)
    kept = _partial(tmp_path).stat().st_size
    assert 0 < kept < len(PAYLOAD)
    zoo_server.modes["f.bin"] = "ok"
    fetch(url, _partial(tmp_path), options=QUICK)  # a new process would do the same: the state is on disk
    assert _partial(tmp_path).read_bytes() == PAYLOAD
    assert zoo_server.gets("f.bin")[-1][1] == f"bytes={kept}-"


def test_a_changed_file_is_sent_whole_instead_of_resumed(zoo_server, tmp_path):
    url = zoo_server.add("f.bin", PAYLOAD, mode="drop")
    with pytest.raises(DownloadError):
        fetch(url, _partial(tmp_path), options=TransferOptions(retries=0))
    changed = os.urandom(len(PAYLOAD))
    zoo_server.add("f.bin", changed)
    fetch(url, _partial(tmp_path), options=QUICK)
    assert _partial(tmp_path).read_bytes() == changed  # If-Range did not match: 200 with the whole file


def test_a_partial_of_another_url_is_not_resumed(zoo_server, tmp_path):
    zoo_server.add("a.bin", PAYLOAD, mode="drop")
    with pytest.raises(DownloadError):
        fetch(zoo_server.url("a.bin"), _partial(tmp_path), options=TransferOptions(retries=0))
    other = zoo_server.add("b.bin", PAYLOAD[::-1])
    fetch(other, _partial(tmp_path), options=QUICK)
    assert _partial(tmp_path).read_bytes() == PAYLOAD[::-1]
    assert zoo_server.gets("b.bin")[0][1] is None


def test_a_server_that_ignores_range_restarts_cleanly(zoo_server, tmp_path):
    url = zoo_server.add("f.bin", PAYLOAD, mode="drop")
    with pytest.raises(DownloadError):
        fetch(url, _partial(tmp_path), options=TransferOptions(retries=0))
    zoo_server.modes["f.bin"] = "no-range"
    fetch(url, _partial(tmp_path), options=QUICK)
    assert _partial(tmp_path).read_bytes() == PAYLOAD


def test_http_404_is_permanent(zoo_server, tmp_path):
    with pytest.raises(DownloadError) as e:
        fetch(zoo_server.url("missing.bin"), _partial(tmp_path), options=QUICK)
    assert "HTTP 404" in str(e.value) and "\n" not in str(e.value) and not e.value.resumable
    assert len(zoo_server.gets("missing.bin")) == 1  # not retried


def test_http_500_is_retried_then_reported(zoo_server, tmp_path):
    url = zoo_server.add("f.bin", PAYLOAD, mode="500")
    with pytest.raises(DownloadError) as e:
        fetch(url, _partial(tmp_path), options=QUICK)
    assert "HTTP 500" in str(e.value) and "after 3 attempts" in str(e.value)
    assert len(zoo_server.gets("f.bin")) == 3 and not _partial(tmp_path).exists()
    zoo_server.add("g.bin", PAYLOAD, mode="500-once")
    fetch(zoo_server.url("g.bin"), _partial(tmp_path), options=QUICK)
    assert _partial(tmp_path).read_bytes() == PAYLOAD


@pytest.mark.parametrize("mode", ["html", "html-as-file"])
def test_an_html_page_is_refused(zoo_server, tmp_path, mode):
    url = zoo_server.add("RMT_S.pth", PAYLOAD, mode=mode)
    with pytest.raises(DownloadError) as e:
        fetch(url, _partial(tmp_path), options=QUICK)
    assert "answered with an HTML page, not the file" in str(e.value) and "--from" in str(e.value)
    assert not _partial(tmp_path).exists()


def test_offline_mode_makes_no_request(zoo_server, tmp_path, monkeypatch):
    monkeypatch.setenv("RMT_OFFLINE", "1")
    url = zoo_server.add("f.bin", PAYLOAD)
    with pytest.raises(DownloadError) as e:
        fetch(url, _partial(tmp_path), options=QUICK)
    assert e.value.unreachable and "RMT_OFFLINE" in str(e.value)
    assert zoo_server.requests == []
    source = tmp_path / "local.bin"
    source.write_bytes(PAYLOAD)
    fetch(source.as_uri(), _partial(tmp_path), options=QUICK)  # a file:// URL needs no network
    assert _partial(tmp_path).read_bytes() == PAYLOAD


def test_no_route_fails_fast_and_says_so(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DownloadError) as e:
        fetch(f"http://127.0.0.1:{port}/f.bin", _partial(tmp_path), options=TransferOptions(retries=5, backoff_s=10))
    assert e.value.unreachable and "offline or no route" in str(e.value)


def test_a_stalled_server_times_out(tmp_path):
    with socket.socket() as s:  # accepts connections (backlog) but never answers
        s.bind(("127.0.0.1", 0))
        s.listen(4)
        with pytest.raises(DownloadError) as e:
            fetch(f"http://127.0.0.1:{s.getsockname()[1]}/f.bin", _partial(tmp_path),
                  options=TransferOptions(timeout_s=0.3, retries=1, backoff_s=0))
    assert "timed out" in str(e.value) and "after 2 attempts" in str(e.value)


def test_unsupported_and_missing_sources(tmp_path):
    with pytest.raises(DownloadError, match="unsupported URL"):
        fetch("ftp://example.org/f.bin", _partial(tmp_path))
    with pytest.raises(DownloadError, match="no such file"):
        fetch((tmp_path / "nope.bin").as_uri(), _partial(tmp_path))
    with pytest.raises(DownloadError, match="is a directory"):
        fetch(tmp_path.as_uri(), _partial(tmp_path))


def test_transfer_options_from_the_environment(monkeypatch):
    monkeypatch.setenv("RMT_DOWNLOAD_TIMEOUT", "2.5")
    monkeypatch.setenv("RMT_DOWNLOAD_RETRIES", "7")
    monkeypatch.setenv("RMT_DOWNLOAD_BACKOFF", "0.1")
    assert TransferOptions.from_env() == TransferOptions(timeout_s=2.5, retries=7, backoff_s=0.1)
    monkeypatch.setenv("RMT_DOWNLOAD_RETRIES", "many")
    with pytest.raises(ZooError, match="RMT_DOWNLOAD_RETRIES='many' is not a valid count"):
        TransferOptions.from_env()


@pytest.mark.parametrize("variable, text", [
    ("RMT_DOWNLOAD_TIMEOUT", "nan"), ("RMT_DOWNLOAD_TIMEOUT", "inf"), ("RMT_DOWNLOAD_TIMEOUT", "1e400"),
    ("RMT_DOWNLOAD_TIMEOUT", "1e300"), ("RMT_DOWNLOAD_TIMEOUT", "0"), ("RMT_DOWNLOAD_BACKOFF", "nan"),
    ("RMT_DOWNLOAD_BACKOFF", "inf"), ("RMT_DOWNLOAD_BACKOFF", "-1"), ("RMT_DOWNLOAD_RETRIES", "1e3"),
])
def test_odd_environment_values_are_one_line(monkeypatch, variable, text):
    """nan, inf and huge numbers overflowed the socket timeout or broke the backoff's sleep."""
    monkeypatch.setenv(variable, text)
    with pytest.raises(ZooError) as e:
        TransferOptions.from_env()
    assert str(e.value).startswith(f"{variable}={text!r} is not a valid") and "give a" in str(e.value)
    monkeypatch.setenv("RMT_DOWNLOAD_TIMEOUT", "86400")
    monkeypatch.setenv("RMT_DOWNLOAD_BACKOFF", "0")
    monkeypatch.setenv("RMT_DOWNLOAD_RETRIES", "0")
    assert TransferOptions.from_env() == TransferOptions(timeout_s=86400, retries=0, backoff_s=0)


def test_a_malformed_url_is_one_line(tmp_path):
    from rmt.zoo.transfer import unreachable

    with pytest.raises(DownloadError, match=r"'http://\[bad/x' is not a valid URL \(Invalid IPv6 URL\)"):
        fetch("http://[bad/x", _partial(tmp_path), options=QUICK)
    assert unreachable("http://[bad", 1).startswith("'http://[bad' is not a valid URL")
    assert unreachable("http://host:port/", 1).startswith("'http://host:port/' is not a valid URL")


@pytest.mark.parametrize("status", [501, 503, 507, 599])
def test_every_5xx_is_retried(zoo_server, tmp_path, monkeypatch, status):
    """docs/zoo.md: HTTP 408, 429 and 5xx are retried (503 and 507 were not)."""
    serve = zoo_server._serve

    def fail_once(handler):
        if not zoo_server.gets("f.bin"):
            zoo_server.requests.append(("f.bin", None, None))
            handler.send_error(status)
            return
        serve(handler)

    monkeypatch.setattr(zoo_server, "_serve", fail_once)
    notes = []
    fetch(zoo_server.add("f.bin", PAYLOAD), _partial(tmp_path), options=QUICK, notify=notes.append)
    assert _partial(tmp_path).read_bytes() == PAYLOAD
    assert any(f"HTTP {status}" in n and "retrying" in n for n in notes)
