"""The page at `/`, driven in headless Chromium against the real server: what a person sees and can do."""

from __future__ import annotations

import base64
import io
import re
import zipfile
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from backend.apikeys import digest_of
from tests.browser.conftest import REPO_ROOT, Server, screenshot, write_images
from tests.helpers import make_image_bytes

pytestmark = pytest.mark.browser


def upload(server: Server, names_and_seeds: dict[str, int]) -> list[dict[str, Any]]:
    """Store images through the API (the page is tested elsewhere for this): their records, in order."""
    files = [
        ("files", (name, make_image_bytes(seed, size=(160, 120)), "image/jpeg"))
        for name, seed in names_and_seeds.items()
    ]
    answer = httpx.post(server.base + "/images", files=files, timeout=60)
    assert answer.status_code == 201, answer.text
    return [item["image"] for item in answer.json()["items"]]


def gallery_names(page) -> list[str]:
    return page.locator("#gallery .thumb").evaluate_all("cards => cards.map(c => c.title)")


def drop_files(page, selector: str, files: dict[str, bytes]) -> None:
    """Drop files on an element the way a person drags them from their desktop."""
    payload = {name: base64.b64encode(data).decode() for name, data in files.items()}
    transfer = page.evaluate_handle(
        """files => {
            const transfer = new DataTransfer();
            for (const [name, b64] of Object.entries(files)) {
                const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
                transfer.items.add(new File([bytes], name, {type: name.endsWith(".png") ? "image/png" : "image/jpeg"}));
            }
            return transfer;
        }""",
        payload,
    )
    page.dispatch_event(selector, "drop", {"dataTransfer": transfer})


def test_upload_three_images_shows_them_in_the_gallery(page, server: Server, tmp_path: Path) -> None:
    paths = write_images(tmp_path / "pick", {"beach.jpg": 1, "forest.jpg": 2, "city.jpg": 3})
    assert page.is_hidden("#upload-progress")
    # The file picker opens from the keyboard too: Enter on the focused button clicks the file input.
    page.evaluate("document.querySelector('#file-input').addEventListener('click', () => { window.__picked = true; })")
    page.focus("[data-pick=file-input]")
    page.keyboard.press("Enter")
    assert page.evaluate("window.__picked") is True
    with page.expect_file_chooser() as chooser:
        page.click("[data-pick=file-input]")
    chooser.value.set_files([str(p) for p in paths])
    page.wait_for_selector("#upload-status:has-text('Done')")
    assert page.text_content("#upload-status") == "Done: 3 stored, 0 duplicates, 0 rejected."
    assert page.locator("#upload-results .badge.stored").count() == 3
    page.wait_for_function("document.querySelectorAll('#gallery .thumb').length === 3")
    assert sorted(gallery_names(page)) == ["beach.jpg", "city.jpg", "forest.jpg"]
    assert page.text_content("#gallery-count") == "3 images"
    # Every thumbnail really loaded from the service.
    page.wait_for_function(
        "[...document.querySelectorAll('#gallery img')].every(i => i.complete && i.naturalWidth > 0)"
    )
    assert server.get("/images")["count"] == 3
    screenshot(page, "gallery")

    # The same file again is reported as a duplicate, not stored twice.
    page.set_input_files("#file-input", [str(paths[0])])
    page.wait_for_selector("#upload-results li:first-child .badge.duplicate")
    assert page.locator("#upload-results li").count() == 1  # the list shows the latest upload
    assert page.text_content("#upload-results .why").startswith("already stored as #")
    page.click("#upload-results .why")  # the stored image opens
    page.wait_for_selector("#detail[open]")
    assert page.text_content("#detail-title") == "beach.jpg"
    assert server.get("/images")["count"] == 3


def test_drop_uploads_files_and_a_rejected_file_shows_its_reason(page, server: Server) -> None:
    hostile = "<img src=x onerror=window.__injected=1>.jpg"  # browsers send quotes as %22
    drop_files(
        page,
        "#dropzone",
        {"good.jpg": make_image_bytes(5), "notes.jpg": b"just some text, not a picture", hostile: make_image_bytes(6)},
    )
    page.wait_for_selector("#upload-status:has-text('Done')")
    assert page.text_content("#upload-status") == "Done: 2 stored, 0 duplicates, 1 rejected."
    rejected = page.locator("#upload-results li.upload-rejected")
    assert rejected.count() == 1
    assert rejected.locator(".name").text_content() == "notes.jpg"
    assert rejected.locator(".why").text_content() == "file is not a recognised image"
    page.wait_for_function("document.querySelectorAll('#gallery .thumb').length === 2")
    # A filename is shown as text, never run as HTML.
    assert hostile in gallery_names(page)
    assert page.evaluate("window.__injected") is None
    assert server.get("/images")["count"] == 2
    screenshot(page, "upload-results")


@pytest.mark.server_env(MAX_FILES_PER_REQUEST="2")
def test_upload_of_more_files_than_a_request_may_hold_is_sent_in_parts(page, server: Server, tmp_path: Path) -> None:
    paths = write_images(tmp_path / "many", {f"m{i}.jpg": 200 + i for i in range(5)})
    page.set_input_files("#file-input", [str(p) for p in paths])
    page.wait_for_selector("#upload-status:has-text('Done')")
    assert page.text_content("#upload-status") == "Done: 5 stored, 0 duplicates, 0 rejected."
    assert server.get("/images")["count"] == 5


def test_tag_filter_shows_only_tagged_images(page, server: Server) -> None:
    upload(server, {"a.jpg": 1, "b.jpg": 2, "c.jpg": 3, "d.jpg": 4})
    page.reload()
    page.wait_for_function("document.querySelectorAll('#tag-filter option').length > 1")
    option = page.locator("#tag-filter option").nth(1)
    tag = option.get_attribute("value")
    found = re.search(r"\((\d+)\)$", option.text_content())
    assert found is not None, option.text_content()
    count = int(found.group(1))
    page.select_option("#tag-filter", tag)
    page.wait_for_function(f"document.querySelectorAll('#gallery .thumb').length === {count}")
    expected = {image["filename"] for image in server.get(f"/images?tag={quote(tag)}")["data"]}
    assert set(gallery_names(page)) == expected
    assert page.text_content("#gallery-count") == (f"{count} image" if count == 1 else f"{count} images")


def test_gallery_pages_through_the_collection(page, server: Server) -> None:
    upload(server, {f"p{i:02d}.jpg": i for i in range(50)})
    page.reload()
    page.wait_for_function("document.querySelectorAll('#gallery .thumb').length === 48")
    assert page.text_content("#gallery-page") == "1–48 of 50"
    first_page = set(gallery_names(page))
    page.click("#gallery-next")
    page.wait_for_function("document.querySelectorAll('#gallery .thumb').length === 2")
    assert page.text_content("#gallery-page") == "49–50 of 50"
    assert first_page.isdisjoint(gallery_names(page))
    assert page.is_disabled("#gallery-next")


def test_image_details_show_metadata_tags_and_a_caption(page, server: Server) -> None:
    (image,) = upload(server, {"harbour.jpg": 7})
    page.reload()
    page.click("#gallery .thumb")
    page.wait_for_selector("#detail[open]")
    assert page.text_content("#detail-title") == "harbour.jpg"
    meta = page.text_content("#detail-meta")
    assert "160 × 120 px" in meta and image["sha256"] in meta and f"#{image['id']}" in meta
    tags = [t["tag"] for t in image["tags"]]
    chips = page.locator("#detail-tags .chip").all_text_contents()
    assert [chip.rsplit(" ", 1)[0] for chip in chips] == tags
    page.wait_for_function("document.querySelector('#detail-img').naturalWidth === 160")
    assert page.get_attribute("#detail-download", "href") == server.base + f"/images/{image['id']}/file"
    assert page.text_content("#detail-caption") == "none yet"
    page.click("#detail-caption-btn")
    page.wait_for_function("document.querySelector('#detail-caption-btn').textContent === 'Write again'")
    stored = server.get(f"/images/{image['id']}")["caption"]
    assert stored and page.text_content("#detail-caption") == stored
    screenshot(page, "image-detail")


def test_map_shows_one_point_per_image(page, server: Server) -> None:
    images = upload(server, {"one.jpg": 11, "two.jpg": 12, "three.jpg": 13})
    page.click("nav button[data-view=map]")
    page.wait_for_function("organizer.mapPoints().length === 3")
    points = page.evaluate("organizer.mapPoints()")
    assert sorted(p["id"] for p in points) == sorted(i["id"] for i in images)
    assert len({(round(p["x"]), round(p["y"])) for p in points}) == 3  # three separate places
    assert "3 images" in page.text_content("#map-info")
    canvas = page.locator("#map-canvas").bounding_box()
    for point in points:  # hovering each point shows that image's thumbnail
        page.mouse.move(canvas["x"] + point["x"], canvas["y"] + point["y"])
        page.wait_for_selector(f"#map-tip[data-id='{point['id']}']:not([hidden])")
        page.wait_for_function("document.querySelector('#map-tip img').naturalWidth > 0")
    screenshot(page, "map")
    # From the keyboard: arrows choose a point, Enter opens it.
    page.focus("#map-canvas")
    page.keyboard.press("ArrowRight")
    chosen = int(page.get_attribute("#map-tip", "data-id"))
    assert page.is_visible("#map-tip") and chosen in {p["id"] for p in points}
    page.keyboard.press("Enter")
    page.wait_for_selector("#detail[open]")
    assert page.text_content("#detail-title") == {i["id"]: i["filename"] for i in images}[chosen]
    page.keyboard.press("Escape")
    page.wait_for_selector("#detail", state="hidden")
    target = points[0]
    page.mouse.click(canvas["x"] + target["x"], canvas["y"] + target["y"])
    page.wait_for_selector("#detail[open]")
    names = {i["id"]: i["filename"] for i in images}
    assert page.text_content("#detail-title") == names[target["id"]]


def test_text_search_shows_results_with_scores(page, server: Server) -> None:
    upload(server, {"a.jpg": 21, "b.jpg": 22, "c.jpg": 23})
    page.click("nav button[data-view=search]")
    page.fill("#search-q", "a dog on a beach")
    page.click("#text-search button[type=submit]")
    page.wait_for_function("document.querySelectorAll('#search-results .thumb').length === 3")
    expected = server.get("/search?q=a%20dog%20on%20a%20beach&top_k=20")["results"]
    assert gallery_like(page, "#search-results") == [r["image"]["filename"] for r in expected]
    scores = [float(s) for s in page.locator("#search-results .score").all_text_contents()]
    assert scores == [round(r["score"], 3) for r in expected]
    assert scores == sorted(scores, reverse=True)
    assert page.text_content("#search-summary") == "Best matches for “a dog on a beach”"
    screenshot(page, "search")


def gallery_like(page, grid: str) -> list[str]:
    return page.locator(f"{grid} .thumb").evaluate_all("cards => cards.map(c => c.title)")


def test_search_by_a_dropped_picture_finds_the_same_picture_first(page, server: Server) -> None:
    upload(server, {"a.jpg": 31, "b.jpg": 32, "c.jpg": 33})
    page.click("nav button[data-view=search]")
    drop_files(page, "#search-drop", {"query.jpg": make_image_bytes(32, size=(160, 120))})
    page.wait_for_function("document.querySelectorAll('#search-results .thumb').length === 3")
    assert gallery_like(page, "#search-results")[0] == "b.jpg"
    assert page.locator("#search-results .score").first.text_content() == "1.000"
    assert page.text_content("#search-summary") == "Pictures that look like query.jpg"
    assert server.get("/images")["count"] == 3  # the query was not stored


def test_find_similar_from_an_image_lists_its_look_alikes(page, server: Server) -> None:
    images = upload(server, {"a.jpg": 41, "b.jpg": 42, "c.jpg": 43})
    page.reload()
    page.click(f"#gallery .thumb[data-id='{images[0]['id']}']")
    page.click("#detail-similar")
    page.wait_for_selector("#view-search:not([hidden])")
    page.wait_for_function("document.querySelectorAll('#search-results .thumb').length === 2")
    expected = server.get(f"/images/{images[0]['id']}/similar?top_k=20")["results"]
    assert gallery_like(page, "#search-results") == [r["image"]["filename"] for r in expected]
    assert "a.jpg" not in gallery_like(page, "#search-results")
    assert page.text_content("#search-summary") == "Images that look like a.jpg"


def test_clustering_job_completes_and_clusters_render_with_captions(page, server: Server) -> None:
    upload(server, {f"img{i}.jpg": 50 + i for i in range(6)})
    page.click("nav button[data-view=clusters]")
    page.wait_for_selector("#run-info:has-text('No clustering yet')")
    assert page.is_hidden("#cluster-job")  # no progress bar before there is a job
    page.fill("#cluster-k", "2")
    page.click("#cluster-form button[type=submit]")
    page.wait_for_selector("#cluster-job .job-text:has-text('succeeded')")
    page.wait_for_function("document.querySelectorAll('#clusters .cluster').length === 2")
    run = server.get("/clusters")  # the run the page shows is the latest one
    assert page.text_content("#run-info strong").startswith(f"Run #{run['id']} · 2 clusters · 6 images")
    captions = page.locator("#clusters .cluster-caption").all_text_contents()
    assert captions == [c["caption"] for c in run["clusters"]]
    assert all(captions)
    sizes = page.locator("#clusters .cluster > .muted").all_text_contents()
    assert sizes == [f"{c['size']} image" + ("s" if c["size"] != 1 else "") for c in run["clusters"]]
    page.wait_for_function("[...document.querySelectorAll('#clusters .reps img')].every(i => i.naturalWidth > 0)")
    screenshot(page, "clusters")

    # The organised zip: a folder per cluster.
    with page.expect_download() as download_info:
        page.click("#export-link")
    archive = zipfile.ZipFile(io.BytesIO(Path(download_info.value.path()).read_bytes()))
    assert len({name.split("/")[0] for name in archive.namelist()}) == 2
    assert len(archive.namelist()) == 6

    # One cluster opened: its images, closest to the centre first.
    first = run["clusters"][0]
    page.locator("#clusters .cluster button:has-text('Open cluster')").first.click()
    page.wait_for_selector("#cluster-detail:not([hidden])")
    page.wait_for_function(f"document.querySelectorAll('#cluster-images .thumb').length === {first['size']}")
    members = server.get(f"/clusters/{run['id']}/0")["data"]
    assert gallery_like(page, "#cluster-images") == [m["image"]["filename"] for m in members]

    # Deleting an image from the open cluster updates its count at once.
    page.locator("#cluster-images .thumb").first.click()
    page.click("#detail-delete")
    page.click("#detail-delete")
    page.wait_for_selector(f"#cluster-title:has-text('{first['size'] - 1} image')")
    assert page.locator("#cluster-images .thumb").count() == first["size"] - 1

    # The map now colours every point by its cluster.
    page.click("nav button[data-view=map]")
    page.wait_for_function("organizer.mapPoints().length === 5 && organizer.mapPoints().every(p => p.cluster !== null)")
    assert page.locator("#map-legend li").count() == 2

    # An image added after the run: the page says the run leaves it out, and the map shows it apart.
    upload(server, {"late.jpg": 60})
    page.reload()
    page.click("nav button[data-view=clusters]")
    page.wait_for_selector("#run-note:has-text('1 image added since this run is not in it')")
    page.click("nav button[data-view=map]")
    page.wait_for_function("organizer.mapPoints().filter(p => p.cluster === null).length === 1")
    assert "not in run" in page.locator("#map-legend li").last.text_content()


def test_group_pictures_without_storing_them(page, server: Server, tmp_path: Path) -> None:
    paths = write_images(tmp_path / "adhoc", {f"g{i}.jpg": 70 + i for i in range(4)})
    page.click("nav button[data-view=clusters]")
    page.click("#adhoc summary")
    page.set_input_files("#adhoc-files", [str(p) for p in paths])
    page.fill("#adhoc-k", "2")
    page.click("#adhoc-form button[type=submit]")
    page.wait_for_function("document.querySelectorAll('#adhoc-results .adhoc-group').length === 2")
    shown = page.locator("#adhoc-results img").evaluate_all("imgs => imgs.map(i => i.alt)")
    assert sorted(shown) == [p.name for p in paths]
    assert server.get("/images")["count"] == 0


def test_delete_moves_the_image_to_the_trash_and_restore_brings_it_back(page, server: Server) -> None:
    images = upload(server, {"keep.jpg": 81, "drop.jpg": 82})
    page.reload()
    page.wait_for_function("document.querySelectorAll('#gallery .thumb').length === 2")
    page.click(f"#gallery .thumb[data-id='{images[1]['id']}']")
    page.click("#detail-delete")
    assert page.text_content("#detail-delete") == "Click again to trash"
    assert server.get("/images")["count"] == 2  # one click alone deletes nothing
    page.click("#detail-delete")
    page.wait_for_selector("#detail", state="hidden")
    page.wait_for_function("document.querySelectorAll('#gallery .thumb').length === 1")
    assert gallery_names(page) == ["keep.jpg"]
    assert page.locator(".toast.info").text_content().startswith("Moved drop.jpg to the trash")
    assert [i["filename"] for i in server.get("/images")["data"]] == ["keep.jpg"]
    # The Trash view shows it with its thumbnail; Restore puts it back in the gallery.
    page.click("nav button[data-view=trash]")
    page.wait_for_selector(f"#trash .trash-card[data-id='{images[1]['id']}']")
    assert "1 image in the trash" in page.text_content("#trash-info")
    page.wait_for_function("document.querySelector('#trash .trash-card img').naturalWidth > 0")
    page.click("#trash .trash-card button:has-text('Restore')")
    page.wait_for_selector("#trash-info:has-text('The trash is empty')")
    assert server.get("/images")["count"] == 2
    page.click("nav button[data-view=gallery]")
    page.wait_for_function("document.querySelectorAll('#gallery .thumb').length === 2")


def test_folder_import_shows_progress_and_its_result(page, server: Server) -> None:
    write_images(server.import_root / "trip", {"one.jpg": 91, "two.jpg": 92, "three.jpg": 93})
    (server.import_root / "trip" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really")
    (server.import_root / "trip" / "notes.txt").write_text("not an image")
    page.click("nav button[data-view=import]")
    page.fill("#import-path", str(server.import_root / "trip"))
    page.click("#import-form button[type=submit]")
    page.wait_for_selector("#import-job .job-text:has-text('succeeded')")
    assert page.text_content(".import-summary") == "3 new images, 0 duplicates, 1 failed, 1 skipped (not images)."
    assert page.locator("#import-result li .name").all_text_contents() == [
        str(server.import_root / "trip" / "broken.jpg")
    ]
    assert page.get_attribute("#import-job progress", "value") == page.get_attribute("#import-job progress", "max")
    screenshot(page, "import")
    page.click("nav button[data-view=gallery]")
    page.wait_for_function("document.querySelectorAll('#gallery .thumb').length === 3")

    # The jobs list shows the import, and a re-embedding job runs from the page to the end.
    page.click("nav button[data-view=service]")
    page.wait_for_selector("#jobs tr:has-text('import') .status-succeeded")
    page.check("#reindex-all")
    page.click("#reindex-form button[type=submit]")
    page.wait_for_selector("#reindex-job .job-text:has-text('succeeded')")
    page.click("#jobs-refresh")
    page.wait_for_selector("#jobs tr:has-text('reindex') .status-succeeded")
    assert "reembedded 3" in page.text_content("#jobs tr:has-text('reindex')")
    screenshot(page, "jobs")


def test_errors_are_shown_in_plain_words(page, server: Server) -> None:
    page.click("nav button[data-view=import]")
    page.fill("#import-path", "/etc")
    page.click("#import-form button[type=submit]")
    toast = page.locator(".toast[role=alert]").last
    toast.wait_for()
    answer = httpx.post(server.base + "/images/import", json={"path": "/etc"})
    assert toast.text_content().startswith(f"Starting the import failed: {answer.json()['detail']}")

    page.click("nav button[data-view=clusters]")
    page.fill("#cluster-k", "zero")
    page.click("#cluster-form button[type=submit]")
    page.wait_for_selector(".toast:has-text('Starting clustering failed')")
    assert "k must be a whole number from 1 to 1000" in page.locator(".toast").last.text_content()

    # A service that cannot be reached says so, in the header and in a message.
    page.fill("#api-base", "http://127.0.0.1:9")
    page.click("#api-form button[type=submit]")
    page.wait_for_selector("#health-text:has-text('Service unreachable')")
    page.wait_for_selector(".toast:has-text('Cannot reach the service at http://127.0.0.1:9')")
    screenshot(page, "errors")


FROM_DISK_KEY = "io_key-for-the-page-opened-from-disk"


@pytest.mark.server_env(CORS_ORIGINS="null", API_KEYS=f"default:{digest_of(FROM_DISK_KEY)}")
def test_page_opened_from_disk_talks_to_the_configured_service(browser, server: Server) -> None:
    """A page opened from disk has the origin `null`, which any sandboxed frame shares: the service admits it
    only with API keys, and the page sends its key."""
    stored = httpx.post(
        server.base + "/images",
        files={"file": ("far.jpg", make_image_bytes(99, size=(160, 120)), "image/jpeg")},
        headers={"X-API-Key": FROM_DISK_KEY},
    )
    assert stored.status_code == 201, stored.text
    context = browser.new_context()
    page = context.new_page()
    page.goto((REPO_ROOT / "test.html").as_uri() + "?api=" + server.base)
    page.wait_for_selector("#health-dot.ok")
    page.fill("#api-key", FROM_DISK_KEY)
    page.click("#key-form button[type=submit]")
    page.wait_for_function("document.querySelectorAll('#gallery .thumb').length === 1")
    assert gallery_names(page) == ["far.jpg"]
    assert page.input_value("#api-base") == server.base
    context.close()
