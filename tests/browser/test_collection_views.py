"""The page's views of where and when: the timeline, the world map of places, the filters, and libraries."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.browser.conftest import Server, screenshot
from tests.conftest import BACKENDS
from tests.helpers import exif_photo

# The views of where and when run on both database backends.
pytestmark = [pytest.mark.browser, pytest.mark.parametrize("database_url", BACKENDS, indirect=True)]

# name: (seed, taken, gps, model)
PHOTOS: dict[str, tuple[int, str | None, tuple[float, float, float] | None, str | None]] = {
    "paris.jpg": (1, "2021:07:14 09:30:05", (48.8582, 2.2945, 35.0), "Canon EOS R6"),
    "sydney.jpg": (2, "2021:07:20 18:00:00", (-33.8568, 151.2153, 4.0), "iPhone 15"),
    "newyear.jpg": (3, "2022:01:01 00:15:00", None, "iPhone 15"),
    "spring.jpg": (4, "2023:05:17 08:00:00", (35.6586, 139.7454, 40.0), "Canon EOS R6"),
    "scan.jpg": (5, None, None, None),
}


def upload_photos(server: Server) -> dict[str, dict[str, Any]]:
    files = [
        ("files", (name, exif_photo(seed, taken=taken, gps=gps, model=model), "image/jpeg"))
        for name, (seed, taken, gps, model) in PHOTOS.items()
    ]
    answer = httpx.post(server.base + "/images", files=files, timeout=60)
    assert answer.status_code == 201, answer.text
    return {item["image"]["filename"]: item["image"] for item in answer.json()["items"]}


def names_of(page, selector: str) -> list[str]:
    return page.locator(selector).evaluate_all("cards => cards.map(c => c.title)")


def test_the_timeline_shows_months_newest_first_and_jumps_to_a_year(page, server: Server) -> None:
    records = upload_photos(server)
    page.click("nav button[data-view=timeline]")
    page.wait_for_selector("#timeline .month")
    keys = page.locator("#timeline .month").evaluate_all("months => months.map(m => m.dataset.key)")
    assert keys == ["2023-05", "2022-01", "2021-07"]
    assert page.text_content("#timeline .month[data-key='2021-07'] h3") == "July 2021 2 photos"
    assert "1 without a date" in page.text_content("#timeline-info")
    page.wait_for_function(
        "[...document.querySelectorAll('#timeline img')].every(i => i.complete && i.naturalWidth > 0)"
    )
    screenshot(page, "timeline")
    # Jump to a year: the newest months up to its end.
    page.select_option("#timeline-year", "2022")
    page.wait_for_function("(document.querySelector('#timeline .month') || {dataset: {}}).dataset.key === '2022-01'")
    assert page.locator("#timeline .month").count() == 2
    page.click("#timeline .month[data-key='2021-07'] .thumb >> nth=0")
    page.wait_for_selector("#detail[open]")
    assert page.text_content("#detail-title") in {"paris.jpg", "sydney.jpg"}
    assert "2021" in page.text_content("#detail-meta")
    assert records


def test_the_map_of_places_draws_the_world_offline_and_a_point_opens_its_photo(page, server: Server) -> None:
    records = upload_photos(server)
    page.click("nav button[data-view=places]")
    page.wait_for_function("document.querySelectorAll('#places-points circle').length === 3")
    assert page.locator("#places-coast polyline").count() > 100  # the bundled coastline, no tile server
    assert page.text_content("#places-info") == "3 photos with a place"
    ids = sorted(int(i) for i in page.locator("#places-points circle").evaluate_all("cs => cs.map(c => c.dataset.id)"))
    assert ids == sorted(records[name]["id"] for name in ("paris.jpg", "sydney.jpg", "spring.jpg"))
    screenshot(page, "places")
    paris = records["paris.jpg"]["id"]
    page.click(f"#places-points circle[data-id='{paris}']")
    page.wait_for_selector("#detail[open]")
    assert page.text_content("#detail-title") == "paris.jpg"
    assert "48.85820, 2.29450" in page.text_content("#detail-meta")
    assert "Canon EOS R6" in page.text_content("#detail-meta")
    page.keyboard.press("Escape")
    # The filters narrow the map too: photos taken in 2023 and later.
    page.fill("#f-after", "2023-01-01")
    page.click("#filters button[type=submit]")
    page.wait_for_function("document.querySelectorAll('#places-points circle').length === 1")
    assert page.get_attribute("#places-points circle", "data-id") == str(records["spring.jpg"]["id"])


def test_the_gallery_and_search_honour_the_date_camera_and_place_filters(page, server: Server) -> None:
    upload_photos(server)
    page.wait_for_function("document.querySelectorAll('#gallery .thumb').length === 5")
    page.fill("#f-after", "2021-07-15")
    page.fill("#f-before", "2022-01-01")  # the last day is included
    page.click("#filters button[type=submit]")
    page.wait_for_function("document.querySelectorAll('#gallery .thumb').length === 2")
    assert sorted(names_of(page, "#gallery .thumb")) == ["newyear.jpg", "sydney.jpg"]
    assert "taken after 2021-07-15" in page.text_content("#f-summary")
    page.click("#f-clear")
    page.fill("#f-camera", "canon")
    page.select_option("#f-sort", "-taken_at")
    page.click("#filters button[type=submit]")
    page.wait_for_function("document.querySelectorAll('#gallery .thumb').length === 2")
    assert names_of(page, "#gallery .thumb") == ["spring.jpg", "paris.jpg"]
    page.click("#f-clear")
    page.wait_for_function("document.querySelectorAll('#gallery .thumb').length === 5")
    page.check("#f-located")
    page.click("nav button[data-view=search]")
    page.fill("#search-q", "a photo")
    page.click("#text-search button[type=submit]")
    page.wait_for_function("document.querySelectorAll('#search-results .thumb').length === 3")
    assert sorted(names_of(page, "#search-results .thumb")) == ["paris.jpg", "spring.jpg", "sydney.jpg"]


def test_a_library_added_in_the_page_is_indexed_in_place_and_removed_without_touching_it(
    page, server: Server, tmp_path: Path
) -> None:
    folder = server.import_root / "nas"
    folder.mkdir()
    for name, (seed, taken, gps, model) in list(PHOTOS.items())[:3]:
        (folder / name).write_bytes(exif_photo(seed, taken=taken, gps=gps, model=model))
        os.utime(folder / name, (time.time() - 60, time.time() - 60))  # photos that were there already
    before = {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in folder.iterdir()}
    page.click("nav button[data-view=import]")
    page.wait_for_selector("#libraries td:has-text('No library yet')")
    page.fill("#library-path", str(folder))
    page.fill("#library-name", "NAS")
    page.click("#library-form button[type=submit]")
    page.wait_for_selector("#library-job .job-text:has-text('3 new')")
    page.wait_for_selector("#libraries tr:has-text('NAS') td:has-text('online')")
    assert "3" in page.text_content("#libraries tr:has-text('NAS') td:nth-child(3)")
    screenshot(page, "libraries")
    assert not any((server.storage / "originals").rglob("*.jpg"))  # nothing copied
    page.click("nav button[data-view=gallery]")
    page.wait_for_function("document.querySelectorAll('#gallery .thumb').length === 3")
    page.click("#gallery .thumb >> nth=0")
    page.wait_for_selector("#detail[open]")
    assert "Library" in page.text_content("#detail-meta")
    page.wait_for_function("document.querySelector('#detail-img').naturalWidth > 0")  # served from the folder
    page.keyboard.press("Escape")
    page.click("nav button[data-view=import]")
    page.click("#libraries tr:has-text('NAS') .library-remove")
    page.click("#libraries tr:has-text('NAS') .library-remove")
    page.wait_for_selector("#libraries td:has-text('No library yet')")
    assert server.get("/images")["count"] == 0
    assert {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in folder.iterdir()} == before
