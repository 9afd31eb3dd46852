"""Draw a COCO file's boxes, polygons and OCR quads on its images, with captions in a band underneath.

Drawing is pure (PIL image in, PIL image out); :func:`render_viz` does the reading and writing and
turns a failed image into a :class:`VizResult` with an error instead of stopping.
"""

from __future__ import annotations

import colorsys
import html
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path, PurePosixPath
from urllib.parse import quote

from PIL import Image, ImageDraw, ImageFont

from .decode import describe_error, open_rgb
from .formats.coco import Annotation, Category, CocoDataset, ImageRecord

RGB = tuple[int, int, int]
Font = ImageFont.FreeTypeFont | ImageFont.ImageFont

# Suffixes kept for drawn images; other images are written as PNG with ``.png`` appended.
KEPT_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}
# Scalable fonts with wide Unicode coverage, looked up in the system font folders by Pillow.
FONT_NAMES = (
    "NotoSansCJK-Regular.ttc",
    "DejaVuSans.ttf",
    "NotoSans-Regular.ttf",
    "Arial Unicode.ttf",
    "Arial.ttf",
)
# A private-use code point no font maps: it draws the font's missing-glyph box (.notdef).
UNMAPPED = "\U0010fffd"
GLYPH_CHECK_SIZE = 16
THUMBNAIL_DIR = "_thumbs"
THUMBNAIL_SIZE = 256
POLYGON_FILL_ALPHA = 64


@dataclass(frozen=True)
class VizResult:
    """One image's outcome: where its drawing went (relative to the output folder), or why it failed."""

    file_name: str
    output: str | None = None
    objects: int = 0
    error: str | None = None
    missing_glyphs: str = ""  # characters of its labels and texts the font draws as empty boxes


@lru_cache(maxsize=1)
def _installed_font() -> str | None:
    """The file of the first of FONT_NAMES Pillow finds (it searches the system font folders)."""
    for name in FONT_NAMES:
        try:
            return str(ImageFont.truetype(name, 12).path)
        except OSError:
            continue
    return None


@lru_cache(maxsize=32)
def load_font(size: int, path: Path | None = None) -> Font:
    """``path`` at ``size`` pixels, else an installed Unicode font, else Pillow's own scalable font."""
    file = str(path) if path else _installed_font()
    return ImageFont.truetype(file, size) if file else ImageFont.load_default(size=size)


def font_description(path: Path | None = None) -> str:
    """The font :func:`load_font` uses for ``path``, in words."""
    return str(path or _installed_font() or "Pillow's built-in font")


@lru_cache(maxsize=8192)
def _glyph(font: Font, char: str) -> tuple[tuple[float, ...], bytes]:
    mask = font.getmask(char)
    return font.getbbox(char), bytes(mask)


def missing_glyphs(font: Font, text: str) -> str:
    """The characters of ``text`` that ``font`` has no glyph for, in code point order.

    A character is missing when it renders exactly as a code point no font maps (the .notdef
    box); spaces and control characters are never drawn, so never missing.
    """
    if not isinstance(font, ImageFont.FreeTypeFont):
        return ""
    notdef = _glyph(font, UNMAPPED)
    drawn = {char for char in text if char.isprintable() and not char.isspace()}
    return "".join(sorted(char for char in drawn if _glyph(font, char) == notdef))


def category_colours(categories: Sequence[Category]) -> dict[int, RGB]:
    """A distinct, saturated colour per category (golden-ratio hues), stable for a given order."""
    colours = {}
    for index, category in enumerate(categories):
        r, g, b = colorsys.hsv_to_rgb((0.08 + index * 0.618034) % 1.0, 0.85, 0.95)
        colours[category.id] = (round(r * 255), round(g * 255), round(b * 255))
    return colours


def text_colour(background: RGB) -> RGB:
    """Black or white, whichever reads better on ``background``."""
    r, g, b = background
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 150 else (255, 255, 255)


def _sizes(image: Image.Image) -> tuple[int, int]:
    """(font size, line width) that stay readable from thumbnails to large photos."""
    short = min(image.size)
    return max(12, round(short / 40)), max(2, round(short / 300))


def _caption(annotation: Annotation) -> str:
    label = " ".join(annotation.label.split())
    return label if annotation.score is None else f"{label} {annotation.score:.2f}"


def draw_annotations(
    image: Image.Image, annotations: Sequence[Annotation], colours: dict[int, RGB], font: Font
) -> Image.Image:
    """A copy of ``image`` with boxes (or polygons and quads, lightly filled) and their labels and scores."""
    _, width = _sizes(image)
    overlay = Image.new("RGBA", image.size, (0, 0, 0, 0))
    fill = ImageDraw.Draw(overlay)
    for annotation in annotations:
        for polygon in annotation.segmentation:
            fill.polygon(polygon, fill=(*colours[annotation.category_id], POLYGON_FILL_ALPHA))
    drawn = Image.alpha_composite(image.convert("RGBA"), overlay).convert("RGB")
    draw = ImageDraw.Draw(drawn)
    for annotation in annotations:
        colour = colours[annotation.category_id]
        for polygon in annotation.segmentation:
            draw.polygon(polygon, outline=colour, width=width)
        if not annotation.segmentation:
            x, y, w, h = annotation.bbox
            draw.rectangle((x, y, x + w, y + h), outline=colour, width=width)
    for annotation in annotations:  # labels last, so that no outline crosses them
        colour, text = colours[annotation.category_id], _caption(annotation)
        if not text:
            continue
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        pad = max(1, (bottom - top) // 6)
        x, y = annotation.bbox[:2]
        text_width, text_height = right - left + 2 * pad, bottom - top + 2 * pad
        x = min(max(x, 0), max(drawn.width - text_width, 0))
        y = y - text_height if y >= text_height else max(y, 0)
        draw.rectangle((x, y, x + text_width, y + text_height), fill=colour)
        draw.text((x + pad - left, y + pad - top), text, fill=text_colour(colour), font=font)
    return drawn


def _pieces(word: str, font: Font, width: float) -> Iterator[str]:
    """``word`` cut into pieces no wider than ``width`` (for unspaced scripts and long tokens)."""
    piece = ""
    for char in word:
        if piece and font.getlength(piece + char) > width:
            yield piece
            piece = char
        else:
            piece += char
    yield piece


def wrap_text(text: str, font: Font, width: float) -> list[str]:
    """``text`` as lines no wider than ``width`` pixels, breaking at spaces where possible."""
    lines = []
    for paragraph in text.splitlines() or [""]:
        line = ""
        for piece in (piece for word in paragraph.split() for piece in _pieces(word, font, width)):
            candidate = f"{line} {piece}" if line else piece
            if line and font.getlength(candidate) > width:
                lines.append(line)
                line = piece
            else:
                line = candidate
        lines.append(line)
    return lines


def add_text_band(image: Image.Image, texts: Sequence[str], font: Font) -> Image.Image:
    """``image`` with ``texts`` wrapped in a white band underneath (the image itself if none)."""
    if not texts:
        return image
    margin = max(4, round(font.size / 2)) if isinstance(font, ImageFont.FreeTypeFont) else 6
    lines = [line for text in texts for line in wrap_text(text, font, image.width - 2 * margin)]
    _, top, _, bottom = font.getbbox("Ág")
    line_height = round((bottom - top) * 1.3)
    banded = Image.new("RGB", (image.width, image.height + len(lines) * line_height + 2 * margin), "white")
    banded.paste(image, (0, 0))
    draw = ImageDraw.Draw(banded)
    for index, line in enumerate(lines):
        draw.text((margin, image.height + margin + index * line_height - top), line, fill="black", font=font)
    return banded


def output_name(file_name: str) -> str:
    """Where an image's drawing goes under the output folder: its own path, as PNG if Pillow can't keep it."""
    return file_name if PurePosixPath(file_name).suffix.lower() in KEPT_SUFFIXES else f"{file_name}.png"


def read_texts(file_name: str, text_dirs: Sequence[Path]) -> list[str]:
    """``<task>: <text>`` for each text folder holding ``<file_name>.txt`` with some text."""
    texts = []
    for text_dir in text_dirs:
        path = text_dir / f"{file_name}.txt"
        text = path.read_text(encoding="utf-8", errors="replace").strip() if path.is_file() else ""
        if text:
            texts.append(f"{text_dir.name}: {text}")
    return texts


def contact_sheet_html(title: str, results: Sequence[VizResult]) -> str:
    """An ``index.html`` of thumbnails linking to the full drawings; failed images show their error."""
    cells = []
    for result in results:
        name = html.escape(result.file_name)
        if result.output is None:
            error = html.escape(result.error or "")
            cells.append(f'<figure class="error"><figcaption>{name}<br>{error}</figcaption></figure>')
            continue
        link, thumbnail = quote(result.output), quote(f"{THUMBNAIL_DIR}/{result.output}")
        cells.append(
            f'<figure><a href="{link}"><img src="{thumbnail}" alt="{name}" loading="lazy"></a>'
            f"<figcaption>{name} · {result.objects} objects</figcaption></figure>"
        )
    return _PAGE.format(title=html.escape(title), cells="\n".join(cells))


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: sans-serif; margin: 1em; }}
main {{ display: flex; flex-wrap: wrap; gap: 12px; }}
figure {{ margin: 0; width: 256px; }}
figure img {{ max-width: 256px; max-height: 256px; }}
figcaption {{ font-size: 12px; overflow-wrap: anywhere; }}
.error figcaption {{ color: #b00; }}
</style></head>
<body><h1>{title}</h1><main>
{cells}
</main></body></html>
"""


def _save(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, quality=90)  # quality is read by JPEG and WebP, ignored by the others


def render_image(
    record: ImageRecord,
    annotations: Sequence[Annotation],
    colours: dict[int, RGB],
    images_dir: Path,
    texts: Sequence[str] = (),
    font_path: Path | None = None,
) -> Image.Image:
    """Read one image (EXIF orientation applied, as the annotator does) and draw on it, ``texts`` in a
    band underneath.

    Raises ValueError when the image's size is not the one recorded in the COCO file.
    """
    image = open_rgb(str(images_dir / record.file_name))
    if image.size != (record.width, record.height):
        raise ValueError(
            f"is {image.width}x{image.height} but the COCO file says {record.width}x{record.height}"
        )
    font = load_font(_sizes(image)[0], font_path)
    return add_text_band(draw_annotations(image, annotations, colours, font), texts, font)


def render_viz(
    dataset: CocoDataset,
    images_dir: Path,
    out_dir: Path,
    text_dirs: Sequence[Path] = (),
    html_index: bool = False,
    font_path: Path | None = None,
) -> Iterator[VizResult]:
    """Draw every image of ``dataset`` into ``out_dir`` (same relative paths), yielding each outcome.

    With ``html_index``, thumbnails go to ``out_dir/_thumbs`` and, once every image is done,
    ``out_dir/index.html`` links them. Each outcome names the characters the font lacks.
    """
    colours = category_colours(dataset.categories)
    check_font = load_font(GLYPH_CHECK_SIZE, font_path)  # a glyph is missing at every size or none
    results = []
    for record in dataset.images:
        annotations = dataset.annotations_by_image[record.id]
        try:
            texts = read_texts(record.file_name, text_dirs)
            drawn = render_image(record, annotations, colours, images_dir, texts, font_path)
            name = output_name(record.file_name)
            _save(drawn, out_dir / name)
            if html_index:
                drawn.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE))
                _save(drawn, out_dir / THUMBNAIL_DIR / name)
            missing = missing_glyphs(check_font, "".join([*map(_caption, annotations), *texts]))
            result = VizResult(record.file_name, name, len(annotations), missing_glyphs=missing)
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            result = VizResult(
                record.file_name, error=f"{images_dir / record.file_name}: {describe_error(error)}"
            )
        results.append(result)
        yield result
    if html_index:
        title = str(dataset.info.get("description") or "florence-cli")
        (out_dir / "index.html").write_text(contact_sheet_html(title, results), encoding="utf-8")
