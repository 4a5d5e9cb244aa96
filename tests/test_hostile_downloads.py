"""Hostile input, downloads: oversized responses are stopped while streaming, non-http(s) URLs refused.

The server runs on 127.0.0.1 in a thread; /nolength/* sends its body without a Content-Length (read
until the connection closes), /length/* declares it.
"""
from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from piggyback.config import ConfigError, DataConfig, DatasetConfig, parse_params
from piggyback.data.download import DownloadError, download_file, fetch_dataset

BODY = b"z" * 300_000


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        self.server.served += 1
        self.send_response(200)
        if self.path.startswith("/length/"):
            self.send_header("Content-Length", str(len(BODY)))
        self.send_header("Connection", "close")
        self.end_headers()
        try:
            self.wfile.write(BODY)
        except OSError:
            pass   # the client hung up once it had read too much


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.served = 0
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.mark.parametrize("kind", ["nolength", "length"])
def test_download_is_stopped_at_max_bytes_while_streaming(server, tmp_path, kind):
    url = f"http://127.0.0.1:{server.server_address[1]}/{kind}/big.zip"
    dest = tmp_path / "big.zip"
    with pytest.raises(DownloadError, match="max_download_bytes"):
        download_file(url, dest, timeout=5, retries=1, max_bytes=100_000)
    assert list(tmp_path.iterdir()) == []       # neither the file nor a partial one is kept
    assert download_file(url, dest, timeout=5, retries=1, max_bytes=len(BODY)) and dest.stat().st_size == len(BODY)


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://127.0.0.1/x.zip", "data:,hello"])
def test_only_http_urls_are_downloaded(tmp_path, url):
    with pytest.raises(DownloadError, match="only http"):
        download_file(url, tmp_path / "x.zip", retries=1)
    assert list(tmp_path.iterdir()) == []


def test_a_file_url_in_params_is_refused_at_load():
    raw = {"datasets": {"maps": {"source": "cyclegan", "url": "file:///etc/passwd"}}}
    with pytest.raises(ConfigError, match=r"datasets\.maps\.url"):
        parse_params(raw)


def test_fetch_dataset_streams_no_more_than_the_limit(server, tmp_path):
    url = f"http://127.0.0.1:{server.server_address[1]}/nolength/maps.zip"
    ds = DatasetConfig(source="cyclegan", name="maps", url=url)
    data = DataConfig(max_download_bytes=50_000, download_retries=1, download_timeout=5)
    with pytest.raises(DownloadError, match="max_download_bytes"):
        fetch_dataset("maps", ds, data, raw_root=tmp_path / "raw", downloads_dir=tmp_path / "dl", backoff=0)
    assert not (tmp_path / "raw" / "maps").exists() and list((tmp_path / "dl").iterdir()) == []
