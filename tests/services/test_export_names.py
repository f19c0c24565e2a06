"""Names in an export: every folder and file name can be created on Linux, macOS and Windows, is at most 150
(file) or 90 (folder) bytes of UTF-8, carries the extension of the stored format, and is unique in its
folder ignoring case, with the number kept when a long name is cut."""

from __future__ import annotations

import unicodedata

import pytest

from backend.services.export import MAX_FOLDER_BYTES, MAX_NAME_BYTES, folder_name, unique_name

WINDOWS_REFUSES = set('<>:"/\\|?*') | {chr(c) for c in range(32)}


def acceptable_everywhere(name: str) -> bool:
    stem = name.split(".", 1)[0].rstrip(" ").upper()
    return (
        0 < len(name.encode()) <= 255
        and not (set(name) & WINDOWS_REFUSES)
        and not name.endswith((".", " "))
        and not name.startswith((".", " "))
        and stem not in {"CON", "PRN", "AUX", "NUL", *(f"COM{n}" for n in range(10)), *(f"LPT{n}" for n in range(10))}
        and name == unicodedata.normalize("NFC", name)
    )


@pytest.mark.parametrize(
    ("uploaded", "extension", "expected"),
    [
        ("holiday.jpg", "jpg", "holiday.jpg"),
        ("holiday.JPEG", "jpg", "holiday.JPEG"),  # the uploader's spelling of the same format stays
        ("scan.tiff", "tif", "scan.tiff"),
        ("x.html", "png", "x.png"),  # an uploader's extension on image content is replaced
        ("x.exe", "jpg", "x.jpg"),
        ("photo.png", "jpg", "photo.jpg"),  # named PNG, decoded as JPEG
        ("noextension", "webp", "noextension.webp"),
        ("CON.png", "png", "_CON.png"),
        ("lpt1.tar.png", "png", "_lpt1.tar.png"),
        ("a:b.png", "png", "a_b.png"),
        ('q"<>|.png', "png", "q____.png"),
        ("trailing... .png", "png", "trailing.png"),
        ("...", "png", "image.png"),
        ("e\u0301te\u0301.jpg", "jpg", "\u00e9t\u00e9.jpg"),  # NFC, as macOS would store it
        ("tab\there.jpg", "jpg", "tab_here.jpg"),
    ],
)
def test_names_are_safe_and_keep_the_stored_format(uploaded: str, extension: str, expected: str) -> None:
    name = unique_name(uploaded, extension, set())
    assert name == expected
    assert acceptable_everywhere(name)


def test_long_names_are_cut_in_bytes_and_keep_their_number() -> None:
    taken: set[str] = set()
    long_ascii = "a" * 300 + ".jpg"
    long_wide = "\u732b" * 200 + ".jpg"  # 3 bytes of UTF-8 each: 600 bytes
    names = [unique_name(given, "jpg", taken) for given in (long_ascii, long_ascii, long_ascii, long_wide, long_wide)]
    assert len(set(names)) == 5
    assert all(len(name.encode()) <= MAX_NAME_BYTES and acceptable_everywhere(name) for name in names)
    assert names[1].endswith(" (2).jpg") and names[2].endswith(" (3).jpg") and names[4].endswith(" (2).jpg")
    assert names[3].startswith("\u732b" * 40)  # cut on a character boundary, not inside one


def test_uniqueness_ignores_case() -> None:
    taken: set[str] = set()
    assert [unique_name(n, "jpg", taken) for n in ("Dog.jpg", "dog.JPG", "DOG.jpg")] == [
        "Dog.jpg",
        "dog (2).JPG",
        "DOG (3).jpg",
    ]


@pytest.mark.parametrize(
    ("caption", "expected"),
    [
        ("a dog on the grass", "01 a dog on the grass"),
        (None, "01 cluster"),
        ("  ...  ", "01 cluster"),
        ('what: a "cat" / dog?', "01 what_ a _cat_ _ dog_"),
        ("ends with dots...", "01 ends with dots"),
    ],
)
def test_folder_names(caption: str | None, expected: str) -> None:
    assert folder_name(1, caption) == expected


def test_long_captions_make_short_folders() -> None:
    name = folder_name(12, "\u00e9" * 100 + " the end")
    assert name.startswith("12 \u00e9") and len(name.encode()) <= MAX_FOLDER_BYTES and acceptable_everywhere(name)
