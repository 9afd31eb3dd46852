"""Datasets where they live: shards, images and lists in a real S3 endpoint on loopback (moto's server,
behind a proxy that throttles, drops and denies on demand), pipe: and .tar.gz shards, --per-shard files.
A fake engine answers from literal outputs after decoding each image for real, so what is read from
the store (and its size) reaches the files; the model is not the point here."""

from __future__ import annotations

import gzip
import io
import re
import shutil
import uuid
from dataclasses import replace
from pathlib import Path

import pytest

from florence_cli import discover, runner, shardlisting, storage
from florence_cli.captions import CaptionClash
from florence_cli.config import CaptionOptions, RunConfig
from florence_cli.decode import ResizeSpec, decode_or_reason
from florence_cli.engine import Started
from florence_cli.jobs import parse_requests
from florence_cli.parse import parse_answer
from florence_cli.records import ImageFailure, ItemResult
from florence_cli.tasks import OptionError

from .conftest import random_image, write_images
from .helpers import image_bytes, output_files, read_jsonl, write_shard
from .test_runner import RAW, FakeEngine

pq = pytest.importorskip("pyarrow.parquet")


class DecodingEngine(FakeEngine):
    """``FakeEngine``, but each image is read and decoded first: a failure to read fails the image, and
    the answers carry the decoded size."""

    def _answer(self, item) -> ItemResult:
        decoded = decode_or_reason(item.source, ResizeSpec(None))
        if isinstance(decoded, str):
            return ItemResult(item, failure=ImageFailure(item.name, decoded))
        width, height, _ = decoded
        answers = [parse_answer(job.task, RAW[job.task.name], width, height) for job in item.jobs]
        return ItemResult(item, width, height, answers=answers)


class ListingEngine(DecodingEngine):
    """``DecodingEngine``, with the driver reading shards by URL ahead in two helper processes."""

    def start(self) -> Started:
        return Started("per-image", listers=2)


@pytest.fixture(autouse=True)
def no_backoff(monkeypatch):
    monkeypatch.setattr(storage, "BACKOFF_S", 0.0)  # retries are counted, not waited for


def _dataset(root: Path, bucket: str) -> Path:
    """Two shards (three samples each) and three loose images under ``root/<bucket>``."""
    data = root / bucket
    for number in range(2):
        samples = [(f"{number}{i:04d}", {"jpg": image_bytes(random_image(10 * number + i), "JPEG"),
                                         "txt": b"a caption"}) for i in range(3)]  # fmt: skip
        write_shard(data / "shards" / f"{number:05d}.tar", samples)
    write_images(data / "imgs", 3)
    return data


def _upload(s3, folder: Path, bucket: str) -> str:
    url = s3.bucket(bucket)
    s3.filesystem().put(str(folder) + "/", f"{bucket}/", recursive=True)
    return url


def _run(
    inputs, out: Path, engine, s3=None, tasks=("OD", "CAPTION"), on_error=None, **options
) -> runner.RunSummary:
    config = replace(RunConfig(output=out), storage_options=s3.options if s3 else None, **options)
    inputs = [str(i) if isinstance(i, Path) else i for i in inputs]
    return runner.run(inputs, parse_requests(list(tasks)), config, engine, on_error=on_error)


@pytest.fixture
def bucket() -> str:
    return f"data-{uuid.uuid4().hex[:12]}"


def test_shards_images_and_lists_in_a_bucket_give_the_files_of_local_disk(s3, bucket, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = _dataset(tmp_path, bucket)
    url = _upload(s3, data, bucket)
    local = _run([f"{bucket}/shards/{{00000..00001}}.tar", f"{bucket}/imgs"], tmp_path / "local",
                 DecodingEngine(), parquet=True)  # fmt: skip
    remote = _run([f"{url}/shards/{{00000..00001}}.tar", f"{url}/imgs"], tmp_path / "remote",
                  DecodingEngine(), s3, parquet=True)  # fmt: skip
    assert not remote.failures, remote.failures
    assert (remote.images, remote.annotated, remote.failed) == (local.images, local.annotated, 0) == (9, 9, 0)
    assert output_files(tmp_path / "remote") == output_files(tmp_path / "local")
    globbed = _run([f"{url}/shards/*.tar"], tmp_path / "globbed", DecodingEngine(), s3, tasks=("CAPTION",))
    assert globbed.annotated == 6
    import pyarrow as pa

    listed = tmp_path / "list.parquet"  # a list of URLs, itself in the bucket
    pq.write_table(pa.table({"url": [f"{url}/imgs/img00.png", "imgs/img01.png"], "key": ["a", "b"]}), listed)
    s3.filesystem().put(str(listed), f"{bucket}/list.parquet")
    from florence_cli.pathlist import PathList

    paths = PathList(f"{url}/list.parquet", "url", "key")
    summary = _run([paths], tmp_path / "list-out", DecodingEngine(), s3, tasks=("CAPTION",))
    assert (summary.annotated, summary.failed) == (2, 0), summary.failures


def test_resume_knows_an_object_by_its_etag_and_opens_a_replaced_one_again(s3, bucket, tmp_path):
    url = _upload(s3, _dataset(tmp_path, bucket), bucket)
    inputs = [f"{url}/shards/{{00000..00001}}.tar", f"{url}/imgs/img00.png"]
    out = tmp_path / "out"
    assert _run(inputs, out, DecodingEngine(), s3).annotated == 7
    s3.faults.clear()
    again = DecodingEngine()
    summary = _run(inputs, out, again, s3)
    assert (again.sent, summary.skipped) == ([], 7)
    shard_reads = [path for method, path in s3.faults.seen if method == "GET" and path.endswith(".tar")]
    assert shard_reads == []  # finished shards are not opened
    replacement = _dataset(tmp_path / "other", bucket)
    write_shard(replacement / "shards/00001.tar", [("10000", {"jpg": image_bytes(random_image(99), "JPEG")})])
    s3.filesystem().put(str(replacement / "shards/00001.tar"), f"{bucket}/shards/00001.tar")
    s3.filesystem().pipe(f"{bucket}/imgs/img00.png", image_bytes(random_image(98)))
    third = DecodingEngine()
    _run(inputs, out, third, s3)
    assert sorted(third.sent) == [f"{bucket}/imgs/img00.png", f"{bucket}/shards/00001/10000"]


def test_per_shard_files_hold_the_single_files_rows_and_are_uploaded_whole(s3, bucket, tmp_path):
    url = _upload(s3, _dataset(tmp_path, bucket), bucket)
    out = tmp_path / "out"
    labels = f"s3://{bucket}/labels"
    summary = _run(
        [f"{url}/shards/*.tar"], out, DecodingEngine(), s3, per_shard=True, parquet=True, upload=labels
    )
    assert (summary.annotated, summary.failed) == (6, 0)
    names = [f"{bucket}/shards/{number}" for number in ("00000", "00001")]  # the shards' output names
    for task in ("od", "caption"):
        whole = pq.read_table(out / f"{task}.parquet").to_pylist()
        shards = [pq.read_table(out / f"{name}.{task}.parquet").to_pylist() for name in names]
        assert shards[0] + shards[1] == whole and len(whole) == 6
        for name in names:
            uploaded = s3.filesystem().cat_file(f"{bucket}/labels/{name}.{task}.parquet")
            assert uploaded == (out / f"{name}.{task}.parquet").read_bytes()
    assert s3.filesystem().cat_file(f"{bucket}/labels/od.json") == (out / "od.json").read_bytes()
    caption = f"caption/{bucket}/shards/00000/00000.txt"  # a shard's text files go with its Parquet files
    assert s3.filesystem().cat_file(f"{bucket}/labels/{caption}") == (out / caption).read_bytes()
    before = {p: p.stat().st_mtime_ns for p in out.glob("**/*.*.parquet")}
    rerun = FakeEngine()
    _run([f"{url}/shards/*.tar"], out, rerun, s3, per_shard=True)
    assert rerun.sent == [] and {p: p.stat().st_mtime_ns for p in out.glob("**/*.*.parquet")} == before


def test_a_shard_cut_mid_way_writes_its_file_from_the_journal_when_finished(tmp_path):
    write_shard(tmp_path / "s.tar", [(f"k{i}", {"png": image_bytes(random_image(i))}) for i in range(5)])
    out = tmp_path / "out"

    def stop(number):
        if number == 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run([tmp_path / "s.tar"], out, FakeEngine(on_batch=stop), per_shard=True, parquet=True)
    assert not list(out.glob("*.*.parquet"))  # not finished: no file yet
    _run([tmp_path / "s.tar"], out, FakeEngine(), per_shard=True, parquet=True)
    [path] = out.glob("**/s.od.parquet")
    assert pq.read_table(path).to_pylist() == pq.read_table(out / "od.parquet").to_pylist()
    assert len(pq.read_table(path)) == 5


def test_faults_are_one_line_each_and_the_rest_of_the_run_goes_on(s3, bucket, tmp_path):
    data = _dataset(tmp_path, bucket)
    cut = (data / "shards/00001.tar").read_bytes()
    url = _upload(s3, data, bucket)
    s3.filesystem().pipe(f"{bucket}/shards/00002.tar", cut[: len(cut) // 2])  # cut short in the store
    s3.filesystem().pipe(f"{bucket}/shards/00003.tar", cut)
    s3.filesystem().pipe(f"{bucket}/shards/00004.tar", cut)
    s3.filesystem().pipe(f"{bucket}/shards/00005.tar", cut)
    s3.faults.add(lambda m, p: "00003.tar" in p, "drop")  # every time: the shard fails
    s3.faults.add(lambda m, p: "00004.tar" in p, "throttle", times=3)  # then it answers: done
    # mid-read, more often than the client library tries a request: florence-cli tries again
    s3.faults.add(lambda m, p: "00005.tar" in p and m == "GET", "drop", times=6)
    s3.faults.add(lambda m, p: "img02.png" in p and m == "GET", "deny")
    errors = []
    summary = _run(
        [f"{url}/shards/{{00000..00005}}.tar", f"s3://no-such-{bucket}/a.tar", f"{url}/imgs/nothing.png",
         f"{url}/imgs"], tmp_path / "out", DecodingEngine(), s3, on_error=errors.append,
    )  # fmt: skip
    reasons = {failure.name: failure.reason for failure in summary.failures}
    assert reasons[f"s3://no-such-{bucket}/a.tar"] == "no such file or directory"
    assert reasons[f"{url}/imgs/nothing.png"] == "no such file or directory"
    assert f"did not answer after {storage.RETRIES + 1} tries" in reasons[f"{url}/shards/00003.tar"]
    assert reasons["imgs/img02.png"].endswith("access denied")
    assert reasons[f"{url}/shards/00002.tar"].startswith(
        "cannot read the tar shard past its sample 2: truncated"
    )
    assert all("\n" not in reason for reason in reasons.values())
    done = {r["file"] for r in read_jsonl(tmp_path / "out/.florence/journal.jsonl") if "file" in r}
    for shard in ("00004", "00005"):  # throttled, dropped: retried, done
        assert {f"{bucket}/shards/{shard}/1000{i}" for i in range(3)} <= done
    assert {f"{bucket}/shards/0000{n}/{n}000{i}" for n in (0, 1) for i in range(3)} <= done
    assert {"imgs/img00.png", "imgs/img01.png"} <= done


def test_a_gzip_shard_and_a_pipe_shard_equal_the_plain_tar(tmp_path, monkeypatch):
    plain = _dataset(tmp_path / "plain", "d") / "shards/00000.tar"
    zipped = tmp_path / "gz/d/shards/00000.tar.gz"
    zipped.parent.mkdir(parents=True)
    with open(plain, "rb") as source, gzip.open(zipped, "wb") as target:
        shutil.copyfileobj(source, target)
    runs = {  # (working directory, input): each names the shard d/shards/00000
        "plain": ("plain", "d/shards/00000.tar"),
        "gz": ("gz", "d/shards/00000.tar.gz"),
        "pipe": ("plain", "pipe:cat d/shards/00000.tar"),
        "gz-pipe": ("gz", "pipe:cat d/shards/00000.tar.gz"),
    }
    files = {}
    for label, (folder, source) in runs.items():
        monkeypatch.chdir(tmp_path / folder)
        summary = _run([source], tmp_path / f"out-{label}", DecodingEngine(), parquet=True)
        assert (summary.annotated, summary.failed) == (3, 0), label
        files[label] = output_files(tmp_path / f"out-{label}")
    assert files["gz"] == files["pipe"] == files["gz-pipe"] == files["plain"]
    failed = _run(["pipe:echo oops >&2; exit 3 # d/shards/x.tar"], tmp_path / "failed", DecodingEngine())
    assert failed.failures[0].reason == (
        "cannot read the tar shard past its sample 0: the command failed (exit status 3): oops"
    )


def test_a_missing_store_package_is_one_line_naming_the_extra():
    pytest.importorskip("fsspec")
    if _has("gcsfs"):
        pytest.skip("gcsfs is installed")
    with pytest.raises(storage.StorageError) as refused:
        storage.filesystem("gs://bucket/a.tar")
    assert refused.value.reason == "gs:// URLs need fsspec and gcsfs: pip install 'florence-cli[gcs]'"


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def test_shards_of_a_split_merge_into_the_per_shard_files_of_one_run(tmp_path):
    from florence_cli.config import Shard
    from florence_cli.merge import merge

    tars = [str(_dataset(tmp_path, "d") / f"shards/0000{n}.tar") for n in range(2)]
    _run(tars, tmp_path / "whole", FakeEngine(), per_shard=True, parquet=True)
    for index in range(3):
        _run(
            tars, tmp_path / f"part{index}", FakeEngine(), per_shard=True, parquet=True, shard=Shard(index, 3)
        )
    merge([tmp_path / f"part{index}" for index in range(3)], tmp_path / "merged")
    whole, merged = output_files(tmp_path / "whole"), output_files(tmp_path / "merged")
    assert merged == whole and sum(name.endswith(".od.parquet") for name in whole) == 2


def test_retries_are_bounded_and_only_for_what_may_pass():
    calls = []

    def flaky(error):
        def action():
            calls.append(error)
            raise error

        return action

    cases = [(ConnectionResetError(104, "Connection reset by peer"), storage.RETRIES + 1),
             (OSError(16, "Please reduce your request rate"), storage.RETRIES + 1),
             (FileNotFoundError(2, "NoSuchKey"), 1), (PermissionError(13, "AccessDenied"), 1)]  # fmt: skip
    for error, tries in cases:
        calls.clear()
        with pytest.raises(storage.StorageError) as failed:
            storage.retried(flaky(error), "s3://b/k")
        assert len(calls) == tries
        assert str(failed.value).startswith("s3://b/k: ") and "\n" not in str(failed.value)
    assert failed.value.reason == "access denied"
    outcomes = iter([TimeoutError("read timed out"), b"data"])

    def then_passes():
        outcome = next(outcomes)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    assert storage.retried(then_passes, "s3://b/k") == b"data"


def test_urls_and_identities():
    assert storage.is_url("s3://b/k.tar") and storage.is_url("pipe:cat a.tar") and storage.is_url("file:///a")
    assert not storage.is_url("shards/00000.tar") and not storage.is_url("c:\\x.tar")
    assert storage.object_name("s3://data/shards/00000.tar") == "data/shards/00000.tar"
    assert storage.identity_from({"size": 5, "ETag": '"abc"'}) == '5:ETag="abc"'
    assert storage.identity_from({"size": 5, "generation": 7, "etag": "x"}) == "5:generation=7"
    assert storage.identity_of("pipe:cat a.tar") == "stream"


def test_a_shard_file_that_cannot_be_uploaded_fails_its_shard_and_the_next_run_uploads_it(
    s3, bucket, tmp_path
):
    url = _upload(s3, _dataset(tmp_path, bucket), bucket)
    out, labels = tmp_path / "out", f"{url}/labels"
    s3.faults.add(lambda m, p: m == "PUT" and "00001.od.parquet" in p, "deny")
    first = _run([f"{url}/shards/*.tar"], out, FakeEngine(), s3, per_shard=True, upload=labels)
    assert [(f.name, f.reason) for f in first.failures] == [
        (f"{bucket}/shards/00001", f"{labels}/ (5 files): access denied")  # 2 Parquet files, 3 captions
    ]
    s3.faults.clear()
    again = FakeEngine()
    second = _run([f"{url}/shards/*.tar"], out, again, s3, per_shard=True, upload=labels)
    assert (again.sent, second.failed) == ([], 0)  # answered already: only its files are written again
    uploaded = s3.filesystem().cat_file(f"{bucket}/labels/{bucket}/shards/00001.od.parquet")
    assert uploaded == (out / bucket / "shards/00001.od.parquet").read_bytes()


def test_the_command_refuses_a_scheme_without_its_package_and_bad_storage_options(tmp_path):
    from click.testing import CliRunner

    from florence_cli.cli import main

    if _has("gcsfs"):
        pytest.skip("gcsfs is installed")
    out = tmp_path / "out"
    result = CliRunner().invoke(
        main, ["annotate", "gs://bucket/shards/00000.tar", "-t", "OD", "-o", str(out)]
    )
    assert result.exit_code == 2 and not out.exists()
    assert result.output.strip() == (
        "Error: gs://bucket/shards/00000.tar: gs:// URLs need fsspec and gcsfs: "
        "pip install 'florence-cli[gcs]'"
    )
    bad = CliRunner().invoke(main, ["annotate", "s3://b/x.tar", "-t", "OD", "--storage-options", "{nope"])
    assert bad.exit_code == 2 and "--storage-options" in bad.output and "not JSON" in bad.output


def test_shards_read_ahead_in_helper_processes_give_what_the_driver_reads(s3, bucket, tmp_path, monkeypatch):
    data = _dataset(tmp_path, bucket)
    cut = (data / "shards/00001.tar").read_bytes()
    url = _upload(s3, data, bucket)
    s3.filesystem().pipe(f"{bucket}/shards/00002.tar", cut[: len(cut) // 2])  # cut short; 00003: none
    inputs = [f"{url}/shards/{{00000..00003}}.tar", f"{url}/shards/00001.tar", f"{url}/imgs"]  # a duplicate
    read_here = _run(inputs, tmp_path / "driver", DecodingEngine(), s3)

    def refuse(*args, **kwargs):
        raise AssertionError("the driver read a shard itself")

    monkeypatch.setattr(discover, "samples", refuse)  # every shard must come from the helper processes
    monkeypatch.setattr(shardlisting, "samples", refuse)
    ahead = _run(inputs, tmp_path / "ahead", ListingEngine(), s3)
    assert [(f.name, f.reason) for f in ahead.failures] == [(f.name, f.reason) for f in read_here.failures]
    counts = ("images", "annotated", "failed", "duplicates", "missing_shards")
    assert [getattr(ahead, name) for name in counts] == [getattr(read_here, name) for name in counts]
    assert (ahead.annotated, ahead.duplicates, ahead.missing_shards) == (10, 1, 1)
    assert output_files(tmp_path / "ahead") == output_files(tmp_path / "driver")
    s3.faults.clear()
    again = _run(inputs, tmp_path / "ahead", ListingEngine(), s3)
    assert again.skipped == 10
    shard_reads = {
        path.rsplit("/", 1)[1] for method, path in s3.faults.seen if method == "GET" and path.endswith(".tar")
    }
    assert shard_reads == {"00002.tar"}  # finished shards are not read ahead; the cut one is read again


def test_an_output_url_takes_loose_images_text_files_and_a_rerun_puts_those_it_lacks(s3, bucket, tmp_path):
    url = _upload(s3, _dataset(tmp_path, bucket), bucket)
    out, labels = tmp_path / "out", f"s3://{bucket}/labels"
    inputs = [f"{url}/imgs", f"{url}/shards/00000.tar"]
    assert _run(inputs, out, DecodingEngine(), s3, upload=labels).annotated == 6
    texts = sorted(path.relative_to(out).as_posix() for path in out.rglob("*.txt"))
    assert len(texts) == 6
    fs = s3.filesystem()
    assert all(fs.cat_file(f"{bucket}/labels/{name}") == (out / name).read_bytes() for name in texts)
    fs.rm(f"{bucket}/labels/{texts[0]}")  # as if the run that wrote it had been killed before its upload
    s3.faults.clear()
    assert _run(inputs, out, DecodingEngine(), s3, upload=labels).skipped == 6
    assert fs.cat_file(f"{bucket}/labels/{texts[0]}") == (out / texts[0]).read_bytes()
    put = [path for method, path in s3.faults.seen if method == "PUT" and path.endswith(".txt")]
    assert len(put) == 1 and put[0].endswith(texts[0].rsplit("/", 1)[1])  # only what the store lacked


def test_caption_files_of_objects_by_url_need_a_local_folder(s3, bucket, tmp_path):
    url = _upload(s3, _dataset(tmp_path, bucket), bucket)
    with pytest.raises(
        CaptionClash, match=r"img00\.png is an object by URL, with no folder to put its caption"
    ):
        _run([f"{url}/imgs"], tmp_path / "out", FakeEngine(), s3, tasks=("CAPTION",),
             captions=CaptionOptions(sidecar=True))  # fmt: skip
    with pytest.raises(OptionError, match=r"`captions\.sidecar_dir` is a folder on this machine, not a URL"):
        _run([f"{url}/imgs"], tmp_path / "out", FakeEngine(), s3, tasks=("CAPTION",),
             captions=CaptionOptions(sidecar_dir=Path(f"s3://{bucket}/captions")))  # fmt: skip
    summary = _run([f"{url}/imgs"], tmp_path / "out", FakeEngine(), s3, tasks=("CAPTION",),
                   captions=CaptionOptions(sidecar_dir=tmp_path / "captions"))  # fmt: skip
    assert summary.annotated == 3 and len(list((tmp_path / "captions").rglob("*.txt"))) == 3


def test_progress_counts_shards_by_url_as_shards_without_reading_them_twice(
    s3, bucket, tmp_path, monkeypatch, capsys
):
    from florence_cli.progress import Progress

    url = _upload(s3, _dataset(tmp_path, bucket), bucket)
    monkeypatch.setenv("FLORENCE_PROGRESS_EVERY", "0")  # a line per batch
    counted = []
    monkeypatch.setattr(Progress, "count_in_background", lambda progress, count: counted.append(count))
    s3.faults.clear()
    summary = _run([f"{url}/shards/{{00000..00002}}.tar"], tmp_path / "out", FakeEngine(), s3, progress=True)
    assert (summary.annotated, summary.missing_shards) == (6, 1)
    assert counted == []  # the images of shards by URL are not counted (that would read them through again)
    reads = [path for method, path in s3.faults.seen if method == "GET" and path.endswith(".tar")]
    assert sorted(reads) == [f"/{bucket}/shards/00000.tar", f"/{bucket}/shards/00001.tar"]  # once each
    lines = capsys.readouterr().err.splitlines()
    assert lines and all(re.fullmatch(r"florence: \d images?, [\d.]+ images/s, [0-3]/3 shards, ETA .+", line)
                         for line in lines)  # fmt: skip
    progress = Progress(True, io.StringIO())
    progress.set_shards(4)
    progress.update(20)
    progress.shard_done()
    progress.shard_done()
    assert re.fullmatch(r"20 images, [\d.]+ images/s, 2/4 shards, ETA 0:00:0\d", progress.line())


def test_a_decode_process_reads_its_chunk_of_shard_images_at_once(s3, bucket, tmp_path):
    from florence_cli.discover import ImageRef
    from florence_cli.tarshards import fetch_members, read_member

    url = _upload(s3, _dataset(tmp_path, bucket), bucket)
    storage.use_options(s3.options)
    found = discover.discover([f"{url}/shards/{{00000..00001}}.tar"])
    members = [ref.member for ref in found if isinstance(ref, ImageRef)]
    assert len(members) == 6 and all(member.data is None for member in members)
    fetched = fetch_members([*members, "imgs/a.png"])
    assert fetched[-1] == "imgs/a.png" and [m.data for m in fetched[:-1]] == [read_member(m) for m in members]
    s3.faults.add(lambda method, path: method == "GET" and "00001.tar" in path, "deny")
    denied = fetch_members(members)  # left to be read alone, where the failure is said in its own words
    assert [m.data is None for m in denied] == [False] * 3 + [True] * 3
    with pytest.raises(storage.StorageError, match="access denied"):
        read_member(denied[3])
