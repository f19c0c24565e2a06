"""The Duplicates and Trash views: groups side by side with the keeper marked, one click to resolve or keep
all, bulk apply after a preview, and restore from the trash; on both database backends."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from bench.data import scene_bytes, variants
from tests.browser.conftest import Server, screenshot
from tests.conftest import BACKENDS

# The tiny test CLIP's cosines mean nothing: the perceptual hash decides, and the similar tier is off.
pytestmark = [
    pytest.mark.browser,
    pytest.mark.parametrize("database_url", BACKENDS, indirect=True),
    pytest.mark.server_env(DUPLICATES_SAME_COSINE="-1", DUPLICATES_SIMILAR_COSINE="1.01"),
]


def upload(server: Server, files: dict[str, bytes]) -> dict[str, dict[str, Any]]:
    answer = httpx.post(
        server.base + "/images",
        files=[("files", (name, data, "image/png")) for name, data in files.items()],
        timeout=120,
    )
    assert answer.status_code == 201, answer.text
    return {item["image"]["filename"]: item["image"] for item in answer.json()["items"]}


def photo_and_copies(seed: int, prefix: str, count: int = 3) -> dict[str, bytes]:
    original = scene_bytes(seed)
    chosen = ["resize 50%", "jpeg q75", "resize 25%", "webp"][:count]
    made = variants(original)
    return {f"{prefix}.png": original, **{f"{prefix}-{i}.jpg": made[name] for i, name in enumerate(chosen)}}


def test_resolve_a_group_keep_all_and_restore_from_the_trash(page, server: Server) -> None:
    stored = upload(
        server, {**photo_and_copies(1, "lake"), **photo_and_copies(2, "hill", 1), "alone.png": scene_bytes(3)}
    )
    page.click("nav button[data-view=duplicates]")
    page.wait_for_function("document.querySelectorAll('#duplicates .dup-group').length === 2")
    lake = page.locator(".dup-group").first  # the largest group first
    assert lake.locator(".dup-member").count() == 4
    # The keeper is marked and ticked, the reason said in words; the others are not ticked.
    keeper = lake.locator(".dup-member.keeper")
    assert keeper.count() == 1 and keeper.get_attribute("data-id") == str(stored["lake.png"]["id"])
    assert "suggested keeper" in keeper.text_content()
    assert "bytes" in lake.locator(".keeper-reason").text_content()
    assert lake.locator("input[type=checkbox]:checked").count() == 1
    assert "same picture" in lake.locator("h3").text_content()
    screenshot(page, "duplicates")

    lake.locator("button:has-text('Keep the ticked')").click()
    page.wait_for_selector(".toast.info:has-text('Moved 3 images to the trash')")
    page.wait_for_function("document.querySelectorAll('#duplicates .dup-group').length === 1")
    assert server.get("/images")["count"] == 4  # lake.png, hill.png and its copy, alone.png

    # Keep all: the hill group goes and stays gone.
    page.locator(".dup-group button:has-text('Keep all')").click()
    page.wait_for_selector("#dup-info:has-text('No duplicates found')")
    assert server.get("/duplicates")["count"] == 0 and server.get("/images")["count"] == 4

    page.click("nav button[data-view=trash]")
    page.wait_for_function("document.querySelectorAll('#trash .trash-card').length === 3")
    assert "3 images in the trash" in page.text_content("#trash-info")
    screenshot(page, "trash")
    back = stored["lake-0.jpg"]["id"]
    page.click(f"#trash .trash-card[data-id='{back}'] button:has-text('Restore')")
    page.wait_for_function("document.querySelectorAll('#trash .trash-card').length === 2")
    assert server.get("/images")["count"] == 5
    hits = server.get("/search?q=a%20lake&top_k=50")["results"]
    assert back in {hit["image"]["id"] for hit in hits}
    # The restored copy brings its group back, with the original marked as keeper.
    page.click("nav button[data-view=duplicates]")
    page.wait_for_function("document.querySelectorAll('#duplicates .dup-member').length === 2")
    assert page.locator(".dup-member.keeper").get_attribute("data-id") == str(stored["lake.png"]["id"])

    # Emptying takes two clicks.
    page.click("nav button[data-view=trash]")
    page.wait_for_function("document.querySelectorAll('#trash .trash-card').length === 2")
    page.click("#trash-empty")
    assert server.get("/trash")["count"] == 2
    page.click("#trash-empty")
    page.wait_for_selector("#trash-info:has-text('The trash is empty')")
    assert server.get("/trash")["count"] == 0


def test_bulk_apply_shows_a_preview_first(page, server: Server) -> None:
    upload(server, {**photo_and_copies(4, "sea", 2), **photo_and_copies(5, "city", 1)})
    page.click("nav button[data-view=duplicates]")
    page.wait_for_function("document.querySelectorAll('#duplicates .dup-group').length === 2")
    page.click("#dup-preview")
    page.wait_for_selector("#dup-plan:not([hidden])")
    assert "would move 3 images to the trash" in page.text_content("#dup-plan-text")
    assert page.locator("#dup-plan-list li").count() == 2
    assert server.get("/images")["count"] == 5  # a preview changes nothing
    page.click("#dup-apply")
    page.wait_for_selector(".toast.info:has-text('Moved 3 images to the trash from 2 groups')")
    page.wait_for_selector("#dup-info:has-text('No duplicates found')")
    assert sorted(i["filename"] for i in server.get("/images")["data"]) == ["city.png", "sea.png"]
    # A scan from the page runs as a job and finds nothing new.
    page.click("#dup-scan")
    page.wait_for_selector("#dup-job .job-text:has-text('succeeded')")
    assert page.locator("#duplicates .dup-group").count() == 0
