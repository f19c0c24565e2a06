"""The page against a service started with API_KEYS: it asks for a key, sends it with every request (images
and downloads too), and shows only the collection the key opens."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from backend.apikeys import digest_of
from tests.browser.conftest import Server, screenshot, write_images
from tests.helpers import make_image_bytes

ALICE = "io_alice-key-for-the-browser-tests"
BOB = "io_bob-key-for-the-browser-tests"

pytestmark = [pytest.mark.browser, pytest.mark.server_env(API_KEYS=f"alice:{digest_of(ALICE)},bob:{digest_of(BOB)}")]

KEY_TOAST = ".toast:has-text('This service needs an API key')"
ALL_THUMBS_LOADED = "[...document.querySelectorAll('{grid} img')].every(i => i.complete && i.naturalWidth > 0)"
# An object URL is revoked once its picture is decoded: fetching it again fails. The grid may be drawn again
# meanwhile (a refresh after an upload), so the first picture is looked up until one has loaded.
SRC_REVOKED = """async (selector) => {
    for (let attempt = 0; attempt < 200; attempt++) {
        const img = document.querySelector(selector);
        if (img && img.src && img.complete && img.naturalWidth > 0) {
            if (!img.src.startsWith("blob:")) return img.src;
            try { await fetch(img.src); return "still alive"; } catch { return "revoked"; }
        }
        await new Promise((resolve) => setTimeout(resolve, 50));
    }
    return "no picture loaded";
}"""


def use_key(page, key: str) -> None:
    page.fill("#api-key", key)
    page.click("#key-form button[type=submit]")


def shown(page, grid: str) -> list[str]:
    return page.locator(f"{grid} .thumb").evaluate_all("cards => cards.map(c => c.title)")


def test_without_a_key_the_page_says_one_is_needed(page, server: Server, tmp_path: Path) -> None:
    page.wait_for_selector(KEY_TOAST)
    assert (
        page.locator(KEY_TOAST)
        .text_content()
        .startswith("This service needs an API key: enter it in the “API key” box at the top of the page")
    )
    page.wait_for_selector("#health-text:has-text('counts hidden until an API key is given')")
    page.wait_for_selector("#gallery .locked")
    assert page.get_attribute("#api-key", "aria-invalid") == "true"
    assert page.is_hidden("#api-key-forget")

    # More refused requests (an upload, other views) still make one message, not one each.
    paths = write_images(tmp_path / "pick", {"a.jpg": 1, "b.jpg": 2})
    page.set_input_files("#file-input", [str(p) for p in paths])
    page.wait_for_selector("#upload-status:has-text('Done')")
    assert page.text_content("#upload-status") == "Done: 0 stored, 0 duplicates, 2 rejected."
    assert page.locator("#upload-results .why").all_text_contents() == ["not stored: the service needs an API key"] * 2
    for view in ("search", "clusters", "map", "service"):
        page.click(f"nav button[data-view={view}]")
    page.wait_for_selector("#service-info dd")
    page.evaluate("refreshHealth()")
    service = page.text_content("#service-info")
    header = page.text_content("header")
    for text in (service, header):
        assert "null" not in text and "undefined" not in text and "NaN" not in text
    assert "counts hidden until an API key is given" in service
    assert page.locator(".toast").count() == 1, page.locator(".toast").all_text_contents()
    screenshot(page, "api-key-needed")
    assert server.get("/health")["images"] is None

    # Something that cannot be sent as a header is refused in the page, not sent.
    use_key(page, "clé à moi")
    page.wait_for_selector(".toast:has-text('That is not an API key')")
    assert page.evaluate("localStorage.getItem('organizer.keys')") is None


def test_a_key_opens_its_own_collection_in_the_page(page, server: Server, tmp_path: Path) -> None:
    page.wait_for_selector(KEY_TOAST)
    use_key(page, ALICE)
    page.wait_for_selector("#gallery .empty:has-text('No images yet')")
    assert page.locator(KEY_TOAST).count() == 0  # the message goes once the key is accepted
    page.wait_for_selector("#health-text:has-text('0 images in collection alice')")
    assert page.get_attribute("#api-key", "type") == "password"

    # Upload, gallery: thumbnails come through fetch with the key, then their object URLs are revoked.
    paths = write_images(tmp_path / "pick", {"beach.jpg": 1, "forest.jpg": 2, "city.jpg": 3})
    page.set_input_files("#file-input", [str(p) for p in paths])
    page.wait_for_selector("#upload-status:has-text('Done')")
    assert page.text_content("#upload-status") == "Done: 3 stored, 0 duplicates, 0 rejected."
    page.wait_for_function("document.querySelectorAll('#gallery .thumb').length === 3")
    assert sorted(shown(page, "#gallery")) == ["beach.jpg", "city.jpg", "forest.jpg"]
    page.wait_for_function(ALL_THUMBS_LOADED.format(grid="#gallery"))
    assert page.evaluate(SRC_REVOKED, "#gallery img") == "revoked"
    page.wait_for_selector("#health-text:has-text('3 images in collection alice')")
    screenshot(page, "api-key-gallery")

    # The image view shows the original, and "Download original" saves its bytes.
    page.click("#gallery .thumb[title='forest.jpg']")
    page.wait_for_selector("#detail[open]")
    page.wait_for_function("document.querySelector('#detail-img').naturalWidth === 160")
    with page.expect_download() as download_info:
        page.click("#detail-download")
    assert download_info.value.suggested_filename == "forest.jpg"
    assert Path(download_info.value.path()).read_bytes() == paths[1].read_bytes()
    page.keyboard.press("Escape")

    # Search.
    page.click("nav button[data-view=search]")
    page.fill("#search-q", "a forest")
    page.click("#text-search button[type=submit]")
    page.wait_for_function("document.querySelectorAll('#search-results .thumb').length === 3")
    page.wait_for_function(ALL_THUMBS_LOADED.format(grid="#search-results"))

    # Clusters: representatives load, and the zip downloads. The map's hover thumbnail loads.
    page.click("nav button[data-view=clusters]")
    page.fill("#cluster-k", "2")
    page.uncheck("#cluster-captions")
    page.click("#cluster-form button[type=submit]")
    page.wait_for_function("document.querySelectorAll('#clusters .cluster').length === 2")
    page.wait_for_function(ALL_THUMBS_LOADED.format(grid="#clusters .reps"))
    with page.expect_download() as download_info:
        page.click("#export-link")
    assert download_info.value.suggested_filename.endswith(".zip")
    assert len(zipfile.ZipFile(download_info.value.path()).namelist()) == 3
    page.click("nav button[data-view=map]")
    page.wait_for_function("organizer.mapPoints().length === 3")
    point = page.evaluate("organizer.mapPoints()")[0]
    canvas = page.locator("#map-canvas").bounding_box()
    page.mouse.move(canvas["x"] + point["x"], canvas["y"] + point["y"])
    page.wait_for_selector(f"#map-tip[data-id='{point['id']}']:not([hidden])")
    page.wait_for_function("document.querySelector('#map-tip img').naturalWidth > 0")
    assert page.evaluate(SRC_REVOKED, "#map-tip img") == "revoked"
    assert page.locator(".toast[role=alert]").count() == 0

    # A reload keeps the key (this browser remembers it for this address).
    page.reload()
    page.wait_for_function("document.querySelectorAll('#gallery .thumb').length === 3")
    assert page.input_value("#api-key") == ALICE
    assert page.is_visible("#api-key-forget")

    # Bob's key: another collection, empty. His first picture gets id 1, like one of Alice's: the page shows
    # his (portrait), not Alice's (landscape) from the same URL.
    use_key(page, BOB)
    page.wait_for_selector("#gallery .empty:has-text('No images yet')")
    page.wait_for_selector("#health-text:has-text('0 images in collection bob')")
    assert page.locator("#gallery .thumb").count() == 0
    portrait = tmp_path / "portrait.jpg"
    portrait.write_bytes(make_image_bytes(9, size=(120, 160)))
    page.set_input_files("#file-input", [str(portrait)])
    page.wait_for_function("document.querySelectorAll('#gallery .thumb').length === 1")
    assert shown(page, "#gallery") == ["portrait.jpg"]
    page.wait_for_function("document.querySelector('#gallery img').naturalWidth === 120")

    # A wrong key: the message again, and nothing of either collection on show.
    use_key(page, "io_not-a-key")
    page.wait_for_selector(KEY_TOAST)
    assert "does not accept the one entered" in page.locator(KEY_TOAST).text_content()
    page.wait_for_selector("#health-text:has-text('counts hidden until a valid API key is given')")
    page.wait_for_selector("#gallery .locked")
    assert page.locator("#gallery .thumb").count() == 0
    assert page.get_attribute("#api-key", "aria-invalid") == "true"

    # Forget: no key sent, none remembered.
    page.click("#api-key-forget")
    page.wait_for_selector("#health-text:has-text('counts hidden until an API key is given')")
    assert page.input_value("#api-key") == ""
    assert page.evaluate("localStorage.getItem('organizer.keys')") == "{}"
