"""Download stage against an HTTP server on 127.0.0.1 (a thread, stopped at the end): full, resumed,
corrupt and stalled downloads, the offline message and manual placement, and the stage end to end."""
from __future__ import annotations

import hashlib
import io
import socket
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from piggyback.config import DataConfig, DatasetConfig
from piggyback.data.download import (ChecksumError, DownloadError, DownloadTimeoutError, OfflineError,
                                     fetch_archive, fetch_dataset)

PAYLOAD = bytes(range(256)) * 2048  # 512 KiB


class _Handler(BaseHTTPRequestHandler):
    """/full/*: Range-aware; /cut/*: the first response stops half-way; /corrupt/*: wrong bytes;
    /stall/*: headers and a little data, then silence until the test ends; /norange/*: ignores Range;
    anything else 404."""

    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_GET(self):
        srv = self.server
        srv.requests.append((self.path, self.headers.get("Range")))
        mode = self.path.split("/")[1]
        body = srv.payload if mode != "corrupt" else srv.payload[:-1] + b"X"
        if mode not in ("full", "cut", "corrupt", "stall", "norange"):
            self.send_error(404)
            return
        start = 0
        rng = self.headers.get("Range")
        if rng and mode not in ("stall", "norange"):
            start = int(rng.split("=")[1].split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        if mode == "cut" and srv.cuts > 0:
            srv.cuts -= 1
            self.wfile.write(body[start:start + len(body) // 2])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)  # drop the connection mid-file
            return
        if mode == "stall":
            self.wfile.write(body[:1000])
            self.wfile.flush()
            srv.release.wait(10)  # bounded: released when the fixture stops the server
            return
        self.wfile.write(body[start:])


@pytest.fixture
def server(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):  # loopback only, never a proxy
        monkeypatch.delenv(var, raising=False)
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    srv.payload, srv.requests, srv.cuts, srv.release = PAYLOAD, [], 1, threading.Event()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    try:
        yield srv
    finally:
        srv.release.set()
        srv.shutdown()
        srv.server_close()
        thread.join(5)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_full_download_records_and_reuses_hash(server, tmp_path):
    downloads = tmp_path / "downloads"
    path, digest = fetch_archive(f"{server.url}/full/maps.zip", downloads, timeout=5, retries=1)
    assert path == downloads / "maps.zip" and path.read_bytes() == PAYLOAD and digest == _sha(PAYLOAD)
    assert (downloads / "maps.zip.sha256").read_text() == f"{digest}  maps.zip\n"
    assert not (downloads / "maps.zip.part").exists()
    n = len(server.requests)
    assert fetch_archive(f"{server.url}/full/maps.zip", downloads, timeout=5, retries=1) == (path, digest)
    assert len(server.requests) == n  # reused, not downloaded again
    path.write_bytes(PAYLOAD[:-1] + b"?")  # the archive changed behind our back
    with pytest.raises(ChecksumError, match="maps.zip"):
        fetch_archive(f"{server.url}/full/maps.zip", downloads, timeout=5, retries=1)


def test_cut_download_resumes_with_range(server, tmp_path):
    url = f"{server.url}/cut/maps.zip"
    with pytest.raises(DownloadError, match="partial file"):
        fetch_archive(url, tmp_path, timeout=5, retries=1)
    part = tmp_path / "maps.zip.part"
    assert part.stat().st_size == len(PAYLOAD) // 2 and not (tmp_path / "maps.zip").exists()
    path, digest = fetch_archive(url, tmp_path, timeout=5, retries=1)
    assert server.requests[-1] == ("/cut/maps.zip", f"bytes={len(PAYLOAD) // 2}-")
    assert digest == _sha(PAYLOAD) and path.read_bytes() == PAYLOAD and not part.exists()


def test_retries_resume_within_one_call(server, tmp_path):
    path, digest = fetch_archive(f"{server.url}/cut/x.zip", tmp_path, timeout=5, retries=3, backoff=0.01)
    assert digest == _sha(PAYLOAD) and len(server.requests) == 2 and server.requests[1][1] is not None


def test_server_without_range_support_restarts(server, tmp_path):
    (tmp_path / "x.zip.part").write_bytes(b"stale bytes from another file")
    path, digest = fetch_archive(f"{server.url}/norange/x.zip", tmp_path, timeout=5, retries=1)
    assert digest == _sha(PAYLOAD) and server.requests[0][1] is not None


def test_corrupt_download_is_refused_and_removed(server, tmp_path):
    ds = DatasetConfig(source="cyclegan", name="maps", url=f"{server.url}/corrupt/maps.zip", sha256=_sha(PAYLOAD))
    with pytest.raises(ChecksumError, match="differs"):
        fetch_dataset("maps", ds, DataConfig(download_timeout=5, download_retries=1), raw_root=tmp_path / "raw",
                      downloads_dir=tmp_path / "downloads")
    assert list((tmp_path / "downloads").iterdir()) == []  # no archive, no .part, no record
    assert not (tmp_path / "raw").exists() or list((tmp_path / "raw").iterdir()) == []


def test_stalled_server_times_out(server, tmp_path):
    t0 = time.monotonic()
    with pytest.raises(DownloadTimeoutError, match="no data for 0.3 s"):
        fetch_archive(f"{server.url}/stall/maps.zip", tmp_path, timeout=0.3, retries=2, backoff=0.01)
    assert time.monotonic() - t0 < 5


def test_http_404_fails_without_retries(server, tmp_path):
    with pytest.raises(DownloadError, match="HTTP 404"):
        fetch_archive(f"{server.url}/missing/maps.zip", tmp_path, timeout=5, retries=4, backoff=5)
    assert len(server.requests) == 1


def test_offline_fails_fast_then_uses_manual_archive(tmp_path):
    with socket.socket() as s:  # a loopback port with nobody listening: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/cyclegan/datasets/maps.zip"
    t0 = time.monotonic()
    with pytest.raises(OfflineError) as err:
        fetch_archive(url, tmp_path / "downloads", timeout=5, retries=4, backoff=5)
    assert time.monotonic() - t0 < 2  # no retries, no backoff
    assert url in str(err.value) and str(tmp_path / "downloads" / "maps.zip") in str(err.value)
    (tmp_path / "downloads" / "maps.zip").write_bytes(PAYLOAD)  # the user puts it there by hand
    path, digest = fetch_archive(url, tmp_path / "downloads", timeout=5, retries=4)
    assert digest == _sha(PAYLOAD) and (tmp_path / "downloads" / "maps.zip.sha256").is_file()


def _tiny_cyclegan_zip() -> bytes:
    buf, img = io.BytesIO(), io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(img, format="PNG")
    with zipfile.ZipFile(buf, "w") as zf:
        for split in ("trainA", "trainB", "testA", "testB"):
            zf.writestr(f"tiny/{split}/0001.png", img.getvalue())
    return buf.getvalue()


def test_stage_downloads_and_extracts(server, tmp_path, monkeypatch):
    from stages.download import main

    server.payload = _tiny_cyclegan_zip()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(
        "datasets:\n"
        f"  tiny: {{source: cyclegan, name: maps, url: '{server.url}/full/tiny.zip'}}\n"
        "  nothing: {source: cyclegan, name: no_such_set}\n")
    main(["tiny"])
    raw = tmp_path / "data/raw/tiny"
    assert sorted(p.name for p in raw.iterdir()) == ["source.json", "testA", "testB", "trainA", "trainB"]
    assert (tmp_path / "data/downloads/tiny.zip.sha256").is_file()
    with pytest.raises(SystemExit, match="no_such_set"):
        main(["nothing"])
