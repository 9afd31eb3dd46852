import os

import pytest

from florence_cli.discover import ImageRef, InputError, discover


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
    assert found[0] == ImageRef("a.png", "a.png", (0, "a.png"))
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
