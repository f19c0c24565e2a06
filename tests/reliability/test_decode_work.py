"""Files whose decoding costs far more than their size says: progressive-JPEG scan bombs, and modes whose
conversion used to need several full-size copies. The work and the memory a file may ask for are bounded
before anything is decoded, and a refusal is a clear 422."""

from __future__ import annotations

import asyncio
import io
import re
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from backend.config import Settings
from backend.services.imaging import decode_memory, jpeg_scans
from tests.conftest import AppRunner
from tests.helpers import make_image_bytes, stored_files
from tests.reliability.realserver import real_server

REPO_ROOT = Path(__file__).resolve().parents[2]
_MARKER = re.compile(rb"\xff+([^\x00\xff])")


def scan_bomb(side: int, repeats: int) -> bytes:
    """A grey progressive JPEG of side x side pixels whose last scan (about a hundred bytes) is repeated:
    each repeat costs a full pass of the decoder over every coefficient."""
    buffer = io.BytesIO()
    Image.new("L", (side, side), 128).save(buffer, "JPEG", progressive=True, quality=75)
    data = buffer.getvalue()
    position, scans, end = 2, [], len(data)
    while (found := _MARKER.search(data, position)) is not None:
        code, after = found.group(1)[0], found.end()
        if code == 0xD9:
            end = found.start()
            break
        if code == 0x01 or 0xD0 <= code <= 0xD7:
            position = after
            continue
        if code == 0xDA:
            scans.append(found.start())
        position = after + int.from_bytes(data[after : after + 2], "big")
    last_scan = data[scans[-1] : end]
    return data[:end] + last_scan * repeats + data[end:]


def test_scans_are_counted_from_the_markers(tmp_path: Path) -> None:
    def saved(data: bytes, name: str) -> Path:
        path = tmp_path / name
        path.write_bytes(data)
        return path

    photo = Image.open(io.BytesIO(make_image_bytes(1, size=(640, 480))))
    baseline, progressive = io.BytesIO(), io.BytesIO()
    photo.save(baseline, "JPEG")
    photo.save(progressive, "JPEG", progressive=True)
    assert jpeg_scans(saved(baseline.getvalue(), "baseline.jpg")) == 1
    assert jpeg_scans(saved(progressive.getvalue(), "progressive.jpg")) == 10  # libjpeg's colour script
    plain = jpeg_scans(saved(scan_bomb(64, 0), "grey.jpg"))
    assert jpeg_scans(saved(scan_bomb(64, 250), "bomb.jpg")) == plain + 250
    # Entropy-coded data full of stuffed 0xFF00 and restart markers is skipped, not mistaken for scans.
    noisy = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 300, 3), dtype=np.uint8)).save(
        noisy, "JPEG", quality=100, restart_marker_blocks=1
    )
    assert jpeg_scans(saved(noisy.getvalue(), "noisy.jpg")) == 1


@pytest.mark.slow
def test_a_scan_bomb_is_refused_before_it_is_decoded_and_search_keeps_answering(
    tmp_path: Path, tiny_clip_dir: Path
) -> None:
    """Against a real server: an 8000x8000 progressive JPEG with 300 and 1,000 repeated scans (a few hundred
    KB, about 40 ms of decoding per scan) is refused from its markers, as an upload and as a query image,
    while text search answers; a normal progressive photo is still stored. The 20 s request timeout only
    guards against a hang: the old service took 12 s and 45 s for these."""
    bomb, bigger = scan_bomb(8000, 300), scan_bomb(8000, 1000)
    assert len(bomb) < 300_000 and len(bigger) < 400_000
    storage = tmp_path / "storage"
    with real_server(storage, tiny_clip_dir) as server, httpx.Client(base_url=server.base, timeout=20) as http:
        upload = http.post("/images", files={"file": ("bomb.jpg", bomb, "image/jpeg")})
        assert upload.status_code == 422, upload.text
        assert upload.json()["code"] == "image_too_complex" and "scans" in upload.json()["detail"]

        async def queries_and_a_search() -> tuple[list[httpx.Response], httpx.Response]:
            async with httpx.AsyncClient(base_url=server.base, timeout=20) as client:
                bombs = [
                    client.post("/search/image", files={"file": ("q.jpg", bigger, "image/jpeg")}) for _ in range(2)
                ]
                answers = await asyncio.gather(*bombs, client.get("/search", params={"q": "a dog"}))
                return list(answers[:2]), answers[2]

        refused, search = asyncio.run(queries_and_a_search())
        assert [(r.status_code, r.json()["code"]) for r in refused] == [(422, "image_too_complex")] * 2
        assert search.status_code == 200, search.text

        normal = io.BytesIO()
        Image.open(io.BytesIO(make_image_bytes(3, size=(3000, 2000)))).save(normal, "JPEG", progressive=True)
        stored = http.post("/images", files={"file": ("photo.jpg", normal.getvalue(), "image/jpeg")})
        assert stored.status_code == 201, stored.text
    assert [p.parent.parent.name for p in stored_files(storage)] == ["originals", "thumbnails"]


MEASURE = """
import resource, sys
from pathlib import Path
from backend.services.imaging import decode_image, make_thumbnail
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
decoded = decode_image(Path(sys.argv[1]), 100_000_000, min_side=256)
make_thumbnail(decoded.rgb, 256)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""


def _image(mode: str, side: int) -> Image.Image:
    rng = np.random.default_rng(0)
    if mode == "F":
        return Image.fromarray(rng.random((side, side), dtype=np.float32))
    if mode == "I":
        return Image.fromarray(rng.integers(0, 70_000, (side, side), dtype=np.int32))
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65_535, (side, side), dtype=np.uint16))
    return Image.new(mode, (side, side))


@pytest.mark.parametrize(
    ("mode", "fmt"), [("F", "TIFF"), ("I", "TIFF"), ("I;16", "PNG"), ("1", "PNG"), ("P", "PNG"), ("RGBA", "PNG")]
)
def test_decoding_stays_within_the_memory_it_is_estimated_to_need(tmp_path: Path, mode: str, fmt: str) -> None:
    """Peak memory of a real decode (and thumbnail) of a 6000x6000 image, measured in a process of its own,
    against the estimate that MAX_DECODE_BYTES is checked with. A float TIFF of this size used to take 0.9 GB
    (four full-size copies on the way to RGB); the estimate is 8 bytes a pixel at most."""
    path = tmp_path / f"image.{fmt.lower()}"
    _image(mode, 6000).save(path, fmt)
    with Image.open(path) as opened:
        estimate = decode_memory(opened, fmt)
    assert estimate <= 8 * 6000 * 6000
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, str(path)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    peak = int(done.stdout.split()[-1])
    assert peak <= estimate + 64 * 2**20, f"{mode}: {peak / 2**20:.0f} MB used, {estimate / 2**20:.0f} MB estimated"


async def test_an_image_needing_more_memory_than_the_limit_is_refused(run_app: AppRunner, settings: Settings) -> None:
    data = io.BytesIO()
    _image("F", 1000).save(data, "TIFF")
    async with run_app(max_decode_bytes=4_000_000) as client:  # 1000x1000 float: 8 MB estimated
        answer = await client.post("/images", files={"file": ("float.tif", data.getvalue(), "image/tiff")})
        assert answer.status_code == 422, answer.text
        assert answer.json()["code"] == "image_too_large" and "memory" in answer.json()["detail"]
        smaller = io.BytesIO()
        _image("F", 500).save(smaller, "TIFF")
        accepted = await client.post("/images", files={"file": ("small.tif", smaller.getvalue(), "image/tiff")})
        assert accepted.status_code == 201, accepted.text
    assert len(stored_files(settings.storage_root)) == 2  # the accepted one's original and thumbnail
