"""The command on a bucket, end to end on the tiny model: shards read from moto's S3 server on loopback
give the files the same shards give on local disk; ``-o`` a URL with ``--per-shard`` uploads each
shard's file once it is done; ``kill -9`` mid-run, then the same command, leaves the uploads of an
uninterrupted run, byte for byte."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

from .conftest import MAX_NEW_TOKENS, random_image
from .helpers import image_bytes, kill_mid_run, output_files, write_shard


def _command(model: Path, inputs: str, out: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "florence_cli", "annotate", inputs, "-t", "OD", "-t", "CAPTION",
            "-m", str(model), "--device", "cpu", "-o", out, "-b", "2", "--workers", "1", "-q",
            "--max-new-tokens", str(MAX_NEW_TOKENS), "--per-shard", "--parquet", *extra]  # fmt: skip


def _objects(s3, prefix: str) -> dict[str, bytes]:
    fs = s3.filesystem()
    return {name[len(prefix) + 1 :]: fs.cat_file(name) for name in fs.find(prefix)}


def test_a_bucket_run_equals_local_disk_and_survives_kill_9(s3, tiny_model, tmp_path):
    bucket = f"data-{uuid.uuid4().hex[:12]}"
    for number in range(4):
        samples = [(f"{number}{i:03d}", {"jpg": image_bytes(random_image(10 * number + i), "JPEG")})
                   for i in range(5)]  # fmt: skip
        write_shard(tmp_path / bucket / "shards" / f"{number:05d}.tar", samples)
    url = s3.bucket(bucket)
    s3.filesystem().put(str(tmp_path / bucket) + "/", f"{bucket}/", recursive=True)
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    options = ["--storage-options", json.dumps(s3.options)]
    pattern = "shards/{00000..00003}.tar"

    local = subprocess.run(_command(tiny_model, f"{bucket}/{pattern}", str(tmp_path / "local")),
                           cwd=tmp_path, env=env, capture_output=True, text=True)  # fmt: skip
    assert local.returncode == 0, local.stderr
    clean = subprocess.run(_command(tiny_model, f"{url}/{pattern}", f"{url}/clean", *options),
                           env=env, capture_output=True, text=True)  # fmt: skip
    assert (clean.returncode, clean.stderr) == (0, "")
    mirror = tmp_path / "cache/florence-cli/outputs/s3" / bucket
    assert output_files(mirror / "clean") == output_files(tmp_path / "local")
    uploaded = _objects(s3, f"{bucket}/clean")
    assert sorted(uploaded) == sorted(
        [f"{bucket}/shards/{n:05d}.{task}.parquet" for n in range(4) for task in ("od", "caption")]
        + [f"caption/{bucket}/shards/{n:05d}/{n}{i:03d}.txt" for n in range(4) for i in range(5)]
        + ["od.json", "od.parquet", "caption.parquet", "errors.jsonl"]
    )
    assert all(data == (mirror / "clean" / name).read_bytes() for name, data in uploaded.items())

    killed = _command(tiny_model, f"{url}/{pattern}", f"{url}/killed", *options)
    journal = mirror / "killed/.florence/journal.jsonl"
    assert 0 < kill_mid_run(killed, journal, 12, env) < 40, "the kill must land mid-run"
    rerun = subprocess.run(killed, env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert _objects(s3, f"{bucket}/killed") == uploaded
