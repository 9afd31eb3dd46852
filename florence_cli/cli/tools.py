"""``florence viz``, ``eval`` and ``export``: thin Click wrappers over viz, evaluate and formats."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import click

from ..evaluate import EvalError, evaluate, format_table, load_ground_truth
from ..formats import EXPORTERS, CocoDataset, FormatError, export_files, load_coco, write_files
from ..records import counted
from ..viz import font_description, load_font, render_viz

MISSING_SHOWN = 12  # characters a missing-glyph warning names

coco_argument = click.argument("coco_json", type=click.Path(exists=True, dir_okay=False, path_type=Path))
output_option = click.option(
    "-o",
    "--output",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Folder to write into (created if missing).",
)


def _load(path: Path) -> CocoDataset:
    try:
        return load_coco(path)
    except FormatError as error:
        raise click.ClickException(str(error)) from None


def _check_font(_ctx: click.Context, _param: click.Parameter, path: Path | None) -> Path | None:
    if path is not None:
        try:
            load_font(12, path)
        except OSError as error:
            raise click.BadParameter(f"{path}: not a usable font ({error})") from None
    return path


def _parse_map(_ctx: click.Context, _param: click.Parameter, values: Sequence[str]) -> dict[str, str]:
    pairs = [pair for value in values for pair in value.split(",") if pair.strip()]
    if any("=" not in pair for pair in pairs):
        raise click.BadParameter(f"expected PRED=GT pairs, got {values!r}")
    return dict((pred.strip(), gt.strip()) for pred, gt in (pair.split("=", 1) for pair in pairs))


@click.command()
@coco_argument
@click.option(
    "--images",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    required=True,
    help="Folder the COCO file_name paths are relative to (the annotated folder).",
)
@output_option
@click.option(
    "--text-dir",
    "text_dirs",
    multiple=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="A text task's folder OUT/<task>; its <image>.txt is drawn under the image. Repeatable.",
)
@click.option("--html", "html_index", is_flag=True, help="Also write index.html, a sheet of thumbnails.")
@click.option(
    "--font",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    callback=_check_font,
    help="TrueType font for labels (default: DejaVu Sans or another installed Unicode font).",
)
def viz(
    coco_json: Path,
    images: Path,
    output: Path,
    text_dirs: tuple[Path, ...],
    html_index: bool,
    font: Path | None,
) -> None:
    """Draw the boxes, polygons and OCR quads of COCO_JSON on its images, one file per image."""
    dataset = _load(coco_json)
    if dataset.images and not any((images / record.file_name).is_file() for record in dataset.images):
        raise click.ClickException(
            f"none of the {len(dataset.images)} images of {coco_json} is in {images} (such as "
            f"{images / dataset.images[0].file_name}): give --images the folder that was annotated"
        )
    drawing = render_viz(dataset, images, output, text_dirs, html_index, font)
    with click.progressbar(
        drawing, length=len(dataset.images), label="Drawing", file=click.get_text_stream("stderr")
    ) as bar:
        results = list(bar)
    failed = [result for result in results if result.error]
    for result in failed:
        click.echo(f"Failed: {result.error}", err=True)
    missing = "".join(sorted({char for result in results for char in result.missing_glyphs}))
    if missing:
        shown = " ".join(missing[:MISSING_SHOWN]) + (" …" if len(missing) > MISSING_SHOWN else "")
        click.echo(
            f"Warning: {font_description(font)} has no glyph for {len(missing)} characters of the labels "
            f"and texts ({shown}), drawn as empty boxes; pass --font with a font that has them "
            "(e.g. NotoSansCJK-Regular.ttc)",
            err=True,
        )
    click.echo(
        f"Drew {len(results) - len(failed)} images into {output}" + (" with index.html" if html_index else "")
    )
    if failed:
        raise click.ClickException(
            f"{len(failed)} of {len(results)} images could not be drawn, first {failed[0].error}"
        )


@click.command("eval")
@click.argument("predictions", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("ground_truth", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--map",
    "synonyms",
    multiple=True,
    callback=_parse_map,
    metavar="PRED=GT[,...]",
    help="Score prediction label PRED as ground-truth category GT. Repeatable.",
)
@click.option(
    "--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="Also write the scores here."
)
def eval_command(
    predictions: Path, ground_truth: Path, synonyms: dict[str, str], json_path: Path | None
) -> None:
    """Score PREDICTIONS (a florence-cli COCO file) against GROUND_TRUTH (COCO) with pycocotools."""
    try:
        report = evaluate(_load(predictions), load_ground_truth(ground_truth), synonyms)
    except (FormatError, EvalError) as error:
        raise click.ClickException(str(error)) from None
    if report.unmatched_labels:
        common = ", ".join(f"{label!r} ({count})" for label, count in report.unmatched_labels.most_common(5))
        dropped = sum(report.unmatched_labels.values())
        click.echo(
            f"Dropped {dropped} predictions whose label matches no category: {common} (see --map)", err=True
        )
    if report.unmatched_images:
        click.echo(
            f"Dropped {len(report.unmatched_images)} images absent from the ground truth, "
            f"e.g. {report.unmatched_images[0]}",
            err=True,
        )
    click.echo(f"Scored {report.predictions} predictions on {report.images} images.")
    for iou_type, scores in report.scores.items():
        click.echo(f"{iou_type}:\n{format_table(scores)}")
    if json_path is not None:
        json_path.write_text(
            json.dumps(report.as_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )


@click.command()
@coco_argument
@click.option("--to", "to", type=click.Choice(list(EXPORTERS)), required=True, help="Format to write.")
@output_option
@click.option(
    "--image-root",
    default=None,
    help="Prefix for image references (e.g. /data/local-files/?d=): Label Studio data.image, "
    "before the URL-encoded file name; VOC <path>.",
)
def export(coco_json: Path, to: str, output: Path, image_root: str | None) -> None:
    """Convert COCO_JSON to YOLO labels + data.yaml, Label Studio tasks.json, or Pascal VOC XML."""
    if image_root is not None and to == "yolo":
        raise click.UsageError("--image-root applies to labelstudio and voc only")
    try:
        files = export_files(_load(coco_json), to, image_root or "")
    except FormatError as error:
        raise click.ClickException(str(error)) from None
    write_files(files, output)
    click.echo(f"Wrote {counted(len(files), 'file')} to {output}")
