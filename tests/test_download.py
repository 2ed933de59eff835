"""DiffusionDB download against a real HTTP server on 127.0.0.1 that serves archives built in
DiffusionDB's format: a full download, a resumed one (the server cuts the connection
mid-file), an interrupted one resumed by a later run, a corrupt archive and a 404."""

import http.server
import threading

import pandas as pd
import pytest

from img2prompt.cli import main
from img2prompt.data.dataset import load_dataset
from img2prompt.data.download import download_diffusiondb, download_file, parse_parts
from img2prompt.errors import DataError

from .test_imports import diffusiondb_part, png_bytes


class Files(http.server.ThreadingHTTPServer):
    """Serves ``files`` (path -> bytes) with Range support; paths in ``cut_once`` are cut off
    halfway through their first response."""

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler)
        self.files, self.cut_once, self.requests = {}, set(), []

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}"


class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        server = self.server
        server.requests.append((self.path, self.headers.get("Range")))
        if self.path not in server.files:
            self.send_error(404)
            return
        body, start = server.files[self.path], 0
        if self.headers.get("Range"):
            start = int(self.headers["Range"].split("=")[1].split("-")[0])
            if start >= len(body):
                self.send_error(416)
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        if self.path in server.cut_once:
            server.cut_once.discard(self.path)
            self.wfile.write(body[start:start + (len(body) - start) // 2])
            self.wfile.flush()
            self.connection.shutdown(2)  # the connection drops mid-file
            return
        self.wfile.write(body[start:])


@pytest.fixture
def server():
    files = Files()
    thread = threading.Thread(target=files.serve_forever, daemon=True)
    thread.start()
    yield files
    files.shutdown()
    files.server_close()


def publish(server, tmp_path, part_numbers=(1, 2)):
    """DiffusionDB's layout: images/part-NNNNNN.zip and metadata.parquet."""
    rows = []
    for number in part_numbers:
        entries = [(f"p{number}-{i}.png", f"prompt {i} of part {number}", png_bytes((40 * i, 90, 10 * number)))
                   for i in range(3)]
        path = diffusiondb_part(tmp_path / f"part-{number:06d}.zip", entries)
        server.files[f"/images/{path.name}"] = path.read_bytes()
        rows += [{"image_name": name, "width": 512, "height": 512, "timestamp": "2022-08-20",
                  "image_nsfw": 0.9 if i == 0 else 0.1, "prompt_nsfw": 0.05}
                 for i, (name, _, _) in enumerate(entries)]
    pd.DataFrame(rows).to_parquet(tmp_path / "metadata.parquet")
    server.files["/metadata.parquet"] = (tmp_path / "metadata.parquet").read_bytes()


def test_parts_are_parsed_and_checked():
    assert parse_parts("1-3,7") == [1, 2, 3, 7]
    with pytest.raises(DataError, match="numbered 1 to 2000"):
        parse_parts("0-2")
    with pytest.raises(DataError, match="ranges such as"):
        parse_parts("one")


def test_full_download_writes_a_dataset_with_the_metadata(server, tmp_path, capsys):
    publish(server, tmp_path)
    out = tmp_path / "ddb"
    assert main(["data", "download", "diffusiondb", "--out", str(out), "--parts", "1-2",
                 "--base-url", server.url, "--quiet"]) == 0
    assert "kept 6 images" in capsys.readouterr().out
    dataset = load_dataset(out)
    assert len(dataset) == 6 and "prompt 1 of part 2" in dataset.prompts
    table = pd.read_csv(out / "prompts.csv")
    for column in ("seed", "step", "cfg", "sampler", "part", "width", "image_nsfw", "prompt_nsfw"):
        assert column in table.columns, column
    assert not list((out / "downloads").glob("*.partial"))


def test_nsfw_rows_can_be_dropped(server, tmp_path):
    publish(server, tmp_path)
    summary = download_diffusiondb(tmp_path / "ddb", "1-2", server.url, drop_nsfw=0.5, progress=False,
                                   log=lambda _: None)
    assert (summary["kept"], summary["dropped_nsfw"]) == (4, 2)
    dataset = load_dataset(tmp_path / "ddb")
    assert len(dataset) == 4 and len(list((tmp_path / "ddb" / "images").iterdir())) == 4


def test_a_connection_cut_mid_file_is_resumed_with_a_range_request(server, tmp_path):
    publish(server, tmp_path, (1,))
    server.cut_once.add("/images/part-000001.zip")
    summary = download_diffusiondb(tmp_path / "ddb", "1", server.url, progress=False, log=lambda _: None)
    assert summary["kept"] == 3
    ranges = [r for path, r in server.requests if path == "/images/part-000001.zip"]
    assert ranges[0] is None and ranges[1].startswith("bytes=") and ranges[1] != "bytes=0-"
    assert (tmp_path / "ddb" / "downloads" / "part-000001.zip").read_bytes() == \
        server.files["/images/part-000001.zip"]


def test_an_interrupted_download_resumes_in_a_later_run(server, tmp_path):
    publish(server, tmp_path, (1,))
    body = server.files["/images/part-000001.zip"]
    dest = tmp_path / "downloads" / "part-000001.zip"
    dest.parent.mkdir()
    half = len(body) // 2
    (dest.parent / "part-000001.zip.partial").write_bytes(body[:half])  # left by a killed run
    download_file(f"{server.url}/images/part-000001.zip", dest, progress=False)
    assert dest.read_bytes() == body
    assert server.requests[-1][1] == f"bytes={half}-"


def test_a_corrupt_archive_is_refused_and_never_kept(server, tmp_path):
    publish(server, tmp_path, (1,))
    body = bytearray(server.files["/images/part-000001.zip"])
    body[len(body) // 3] ^= 0xFF  # flip a byte inside a member's data
    server.files["/images/part-000001.zip"] = bytes(body)
    with pytest.raises(DataError, match="corrupt archive"):
        download_diffusiondb(tmp_path / "ddb", "1", server.url, progress=False, log=lambda _: None)
    downloads = tmp_path / "ddb" / "downloads"
    assert not (downloads / "part-000001.zip").exists()
    assert not (downloads / "part-000001.zip.partial").exists()
    assert not (tmp_path / "ddb" / "prompts.csv").exists()


def test_a_missing_part_is_a_clear_error(server, tmp_path, capsys):
    publish(server, tmp_path, (1,))
    assert main(["data", "download", "diffusiondb", "--out", str(tmp_path / "ddb"), "--parts", "5",
                 "--base-url", server.url, "--quiet"]) == 2
    message = capsys.readouterr().err
    assert "part-000005.zip: HTTP 404" in message and "--base-url" in message
