import os

import pytest

from florence_cli.discover import Duplicate, ImageRef, InputError, discover, printable


def _touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")


@pytest.fixture
def tree(tmp_path):
    for name in [
        "b.JPG",
        "a.png",
        "sub/c.jpeg",
        "sub/deeper/d.webp",
        ".hidden/e.jpg",
        "notes.txt",
        "f.TIFF",
        "g.gif",
    ]:
        _touch(tmp_path / "imgs" / name)
    return tmp_path / "imgs"


def test_folder_walk_is_sorted_recursive_and_skips_hidden_and_non_images(tree):
    found = list(discover([str(tree)]))
    assert all(isinstance(f, ImageRef) for f in found)
    assert [f.name for f in found] == ["a.png", "b.JPG", "f.TIFF", "g.gif", "sub/c.jpeg", "sub/deeper/d.webp"]
    assert [f.order for f in found] == sorted(f.order for f in found)


def test_named_files_and_errors(tree, monkeypatch):
    monkeypatch.chdir(tree)
    found = list(discover(["a.png", "notes.txt", "missing.jpg"]))
    assert found[0] == ImageRef("a.png", "a.png", ("a.png",))
    assert isinstance(found[1], InputError) and "not an image" in found[1].reason
    assert isinstance(found[2], InputError) and "no such file" in found[2].reason


def test_stdin_paths(tree, monkeypatch):
    monkeypatch.chdir(tree.parent)
    lines = ["./imgs/sub/c.jpeg\n", "\n", "imgs/a.png\r\n"]
    found = list(discover(["-"], lines))
    assert [f.name for f in found] == ["imgs/sub/c.jpeg", "imgs/a.png"]


def test_several_folders_are_prefixed(tree, tmp_path):
    _touch(tmp_path / "other" / "a.png")
    names = [f.name for f in discover([str(tree), str(tmp_path / "other")])]
    assert "imgs/a.png" in names and "other/a.png" in names


def test_unreadable_folder_is_reported_whoever_runs(tree, monkeypatch):
    real_scandir = os.scandir

    def scandir(path):
        if str(path).endswith("sub"):
            raise PermissionError(13, "Permission denied")
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    found = list(discover([str(tree)]))
    errors = [f for f in found if isinstance(f, InputError)]
    assert len(errors) == 1 and errors[0].reason == "cannot read folder: Permission denied"
    assert [f.name for f in found if isinstance(f, ImageRef)] == ["a.png", "b.JPG", "f.TIFF", "g.gif"]


def _names(found):
    return [f.name for f in found if isinstance(f, ImageRef)]


def test_a_link_loop_is_walked_once_and_each_file_annotated_once(tree):
    os.symlink(".", tree / "loop")  # imgs/loop -> imgs
    os.symlink("..", tree / "sub" / "up")  # imgs/sub/up -> imgs
    found = list(discover([str(tree)]))
    assert _names(found) == ["a.png", "b.JPG", "f.TIFF", "g.gif", "sub/c.jpeg", "sub/deeper/d.webp"]
    assert not [f for f in found if isinstance(f, InputError)]


def test_the_same_file_reached_twice_is_found_once(tree, monkeypatch):
    monkeypatch.chdir(tree.parent)
    os.symlink("../a.png", tree / "sub" / "link-to-a.png")
    found = list(discover(["imgs", "imgs/a.png", "imgs/sub/c.jpeg", "imgs/a.png"]))
    names = _names(found)
    assert names.count("imgs/a.png") == 1 and names.count("imgs/sub/c.jpeg") == 1
    assert "imgs/sub/link-to-a.png" not in names  # the link is the same file as a.png
    duplicates = [f for f in found if isinstance(f, Duplicate)]
    paths = sorted(d.path for d in duplicates)
    assert paths == ["imgs/a.png", "imgs/a.png", "imgs/sub/c.jpeg", "imgs/sub/link-to-a.png"]


def test_folders_with_the_same_name_keep_apart(tmp_path):
    for parent in ("a", "b"):
        _touch(tmp_path / parent / "img" / "x.png")
    found = list(discover([str(tmp_path / "a" / "img"), str(tmp_path / "b" / "img")]))
    assert _names(found) == ["a/img/x.png", "b/img/x.png"]


def test_a_second_file_that_would_take_a_name_is_refused(tmp_path, monkeypatch):
    # a folder input named "imgs" and, from the working directory, another file imgs/x.png
    _touch(tmp_path / "elsewhere" / "imgs" / "x.png")
    _touch(tmp_path / "cwd" / "imgs" / "x.png")
    monkeypatch.chdir(tmp_path / "cwd")
    found = list(discover([str(tmp_path / "elsewhere" / "imgs"), "-"], ["imgs/x.png\n"]))
    assert _names(found) == ["imgs/x.png"] and found[0].path.startswith(str(tmp_path / "elsewhere"))
    assert isinstance(found[1], InputError) and "is taken by another file" in found[1].reason


def test_a_name_that_is_not_utf8_is_one_error_and_the_walk_goes_on(tree):
    bad = os.fsdecode(b"\xff\xfe.jpg")
    _touch(tree / bad)
    found = list(discover([str(tree)]))
    errors = [f for f in found if isinstance(f, InputError)]
    assert len(errors) == 1 and errors[0].path.endswith("\\xff\\xfe.jpg") and "UTF-8" in errors[0].reason
    errors[0].path.encode("utf-8")  # printable: it goes to a terminal and into errors.jsonl
    assert len(_names(found)) == 6


def test_printable_escapes_control_characters_and_bytes():
    assert printable("a\nb\tc.jpg") == "a\\nb\\tc.jpg"
    assert printable(os.fsdecode(b"caf\xe9.png")) == "caf\\xe9.png"
    assert printable("café 東京.png") == "café 東京.png"


def test_hard_links_are_files_of_their_own_and_broken_links_say_why(tree):
    os.link(tree / "a.png", tree / "a-copy.png")
    os.symlink("nowhere.png", tree / "broken.png")
    os.symlink("self", tree / "self")  # a link to itself: neither a folder nor an image, skipped
    found = list(discover([str(tree)]))
    assert _names(found)[:2] == ["a-copy.png", "a.png"]
    errors = [f for f in found if isinstance(f, InputError)]
    assert len(errors) == 1 and errors[0].path.endswith("broken.png") and "No such file" in errors[0].reason
