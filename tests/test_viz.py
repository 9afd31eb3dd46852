"""``florence viz``: pixels drawn where the annotations are, untouched elsewhere; failures per image."""

from __future__ import annotations

import json

import numpy as np
from click.testing import CliRunner
from PIL import Image, ImageFont

from florence_cli.cli.tools import viz
from florence_cli.formats.coco import Category
from florence_cli.viz import (
    VizResult,
    category_colours,
    contact_sheet_html,
    load_font,
    missing_glyphs,
    output_name,
    wrap_text,
)

GREY = (128, 128, 128)
CATEGORIES = [{"id": 1, "name": "car"}, {"id": 2, "name": "text"}]
ANNOTATIONS = [
    {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 30, 40, 20], "label": "car", "score": 0.87},
    {"id": 2, "image_id": 2, "category_id": 2, "bbox": [10, 30, 60, 20], "label": "東京 café",
     "segmentation": [[10, 30, 70, 30, 70, 50, 10, 50]]},
]  # fmt: skip


def make_inputs(tmp_path, names=("a.png", "sub/b.png")):
    """Grey 120x80 images (only those in ``names`` exist on disk) and a COCO file listing a.png, sub/b.png."""
    images = tmp_path / "images"
    for name in names:
        (images / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (120, 80), GREY).save(images / name)
    records = [
        {"id": i + 1, "file_name": name, "width": 120, "height": 80}
        for i, name in enumerate(("a.png", "sub/b.png"))
    ]
    coco = tmp_path / "od.json"
    coco.write_text(json.dumps({"images": records, "annotations": ANNOTATIONS, "categories": CATEGORIES}))
    return coco, images


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def test_viz_draws_annotations_and_leaves_the_rest(tmp_path):
    coco, images = make_inputs(tmp_path)
    out = tmp_path / "viz"
    result = CliRunner().invoke(viz, [str(coco), "--images", str(images), "-o", str(out)])
    assert result.exit_code == 0, result.output
    for name in ("a.png", "sub/b.png"):
        drawn = pixels(out / name)
        assert drawn.shape == (80, 120, 3)
        assert (drawn[30, 30] != GREY).any()  # the top edge of the box / quad
        assert (drawn[70:, 80:] == GREY).all()  # far from both
    inside = pixels(out / "sub/b.png")[40, 40]
    assert (inside != GREY).any() and (np.abs(inside - GREY) < 100).all()  # a light fill
    assert not (tmp_path / "viz" / "index.html").exists()


def test_viz_draws_text_files_in_a_band_and_writes_a_contact_sheet(tmp_path):
    coco, images = make_inputs(tmp_path)
    captions = tmp_path / "out" / "caption"
    (captions / "sub").mkdir(parents=True)
    (captions / "sub" / "b.png.txt").write_text("a grey picture of Zürich", encoding="utf-8")
    out = tmp_path / "viz"
    args = [str(coco), "--images", str(images), "-o", str(out), "--text-dir", str(captions), "--html"]
    assert CliRunner().invoke(viz, args).exit_code == 0
    banded, plain = pixels(out / "sub/b.png"), pixels(out / "a.png")
    assert plain.shape == (80, 120, 3) and banded.shape[0] > 80
    assert (banded[80:] != 255).any()  # text in the white band
    index = (out / "index.html").read_text(encoding="utf-8")
    assert 'href="sub/b.png"' in index and 'src="_thumbs/sub/b.png"' in index
    assert (out / "_thumbs" / "a.png").is_file()


def test_viz_goes_on_after_a_missing_image_and_names_it(tmp_path):
    coco, images = make_inputs(tmp_path, names=("sub/b.png",))
    out = tmp_path / "viz"
    result = CliRunner().invoke(viz, [str(coco), "--images", str(images), "-o", str(out), "--html"])
    assert result.exit_code == 1
    missing = f"{images / 'a.png'}: No such file or directory"
    assert f"Failed: {missing}\n" in result.output
    assert f"Error: 1 of 2 images could not be drawn, first {missing}\n" in result.output
    assert (out / "sub" / "b.png").is_file() and not (out / "a.png").exists()
    assert "a.png<br>" in (out / "index.html").read_text(encoding="utf-8")


def test_viz_with_a_folder_holding_none_of_the_images_is_one_line(tmp_path):
    coco, _ = make_inputs(tmp_path, names=())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = CliRunner().invoke(viz, [str(coco), "--images", str(elsewhere), "-o", str(tmp_path / "viz")])
    assert result.exit_code == 1 and result.output.count("\n") == 1
    assert result.output.startswith(f"Error: none of the 2 images of {coco} is in {elsewhere}")


def test_viz_reports_malformed_json_and_size_mismatch(tmp_path):
    coco, images = make_inputs(tmp_path)
    Image.new("RGB", (10, 10)).save(images / "a.png")
    result = CliRunner().invoke(viz, [str(coco), "--images", str(images), "-o", str(tmp_path / "viz")])
    assert result.exit_code == 1 and "a.png: is 10x10 but the COCO file says 120x80" in result.output
    coco.write_text("[1, 2", encoding="utf-8")
    result = CliRunner().invoke(viz, [str(coco), "--images", str(images), "-o", str(tmp_path / "viz")])
    assert result.exit_code == 1 and result.output.startswith(f"Error: {coco}: not valid JSON")


def builtin_font_file(folder):
    """Pillow's own scalable font (Latin only: no CJK, not even é) as a file for --font."""
    path = folder / "builtin.ttf"
    path.write_bytes(ImageFont.load_default(12).path.getvalue())
    return path


def test_missing_glyphs_are_the_characters_drawn_as_the_notdef_box():
    font = ImageFont.load_default(16)
    assert missing_glyphs(font, "東京 café\tA1 0.87") == "é京東"
    assert missing_glyphs(font, "plain ASCII, 123") == ""


def test_viz_warns_once_naming_font_when_the_font_lacks_glyphs(tmp_path):
    coco, images = make_inputs(tmp_path)
    captions = tmp_path / "out" / "caption"
    captions.mkdir(parents=True)
    (captions / "a.png.txt").write_text("東京の写真", encoding="utf-8")
    font = builtin_font_file(tmp_path)
    out = tmp_path / "viz"
    args = [str(coco), "--images", str(images), "-o", str(out), "--text-dir", str(captions)]
    result = CliRunner().invoke(viz, [*args, "--font", str(font)])
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("Warning:")]
    assert len(warnings) == 1  # two images lack glyphs, one warning
    assert warnings[0].startswith(f"Warning: {font} has no glyph for 6 characters")
    assert "(é の 京 写 東 真)" in warnings[0] and "pass --font" in warnings[0]
    assert (out / "a.png").is_file() and (out / "sub" / "b.png").is_file()  # and kept drawing


def test_wrap_text_fits_width_and_breaks_unspaced_text():
    font = load_font(14)
    lines = wrap_text("A caption with several words\n東京東京東京東京東京東京東京東京", font, 100)
    assert len(lines) >= 3 and all(font.getlength(line) <= 100 for line in lines)
    assert "".join(lines).replace(" ", "") == "Acaptionwithseveralwords東京東京東京東京東京東京東京東京"


def test_fonts_colours_and_names():
    assert isinstance(load_font(20), ImageFont.FreeTypeFont)  # DejaVu Sans, or Pillow's own scalable font
    colours = category_colours([Category(i, str(i)) for i in range(12)])
    assert len(set(colours.values())) == 12
    assert (output_name("sub/a.JPG"), output_name("b.gif")) == ("sub/a.JPG", "b.gif.png")
    sheet = contact_sheet_html("<t>", [VizResult("a b.png", "a b.png", 2), VizResult("c.png", error="gone")])
    assert 'href="a%20b.png"' in sheet and "&lt;t&gt;" in sheet and "gone" in sheet
