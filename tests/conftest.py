"""Shared fixtures: one tiny checkpoint per session, images made on the fly, the reference loop."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from florence_cli.testing.tiny import build_random, make_tiny_model, tilt_towards_eos


def pytest_configure(config):
    # Triton's kernels run on CPU tensors under its interpreter, and whether a kernel is interpreted is
    # fixed when it is defined: the invariant kernels' tests need this before any test module imports
    # triton (loading a transformers model does). Nothing else here runs Triton.
    os.environ.setdefault("TRITON_INTERPRET", "1")


# Short generations keep the suite fast; equality with the reference does not depend on length.
MAX_NEW_TOKENS = 24


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-model"), seed=0)


@pytest.fixture(scope="session")
def varied_dir(tmp_path_factory) -> Path:
    """A tiny checkpoint whose answers end at lengths that differ from image to image."""
    folder = tmp_path_factory.mktemp("varied-model")
    model, processor = build_random(folder, "tiny", seed=0)
    tilt_towards_eos(model, 1.4)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def florence_model(tiny_model):
    from florence_cli.model import FlorenceModel

    return FlorenceModel.load(str(tiny_model), device="cpu")


@pytest.fixture(scope="session")
def annotator(florence_model):
    from florence_cli.annotate import Annotator, GenerationSettings, RunConfig

    config = RunConfig(batch_size=4, generation=GenerationSettings(max_new_tokens=MAX_NEW_TOKENS))
    return Annotator(config, model=florence_model)


def random_image(seed: int, size: tuple[int, int] = (96, 72), mode: str = "RGB") -> Image.Image:
    """A seeded noise image with a few solid blocks, so different seeds give different answers."""
    rng = np.random.default_rng(seed)
    width, height = size
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    for _ in range(3):
        x, y = rng.integers(0, width // 2), rng.integers(0, height // 2)
        pixels[y : y + height // 3, x : x + width // 3] = rng.integers(0, 256, 3, dtype=np.uint8)
    image = Image.fromarray(pixels)
    return image if mode == "RGB" else image.convert(mode)


def write_images(folder: Path, count: int, start_seed: int = 0, ext: str = "png") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"img{i:02d}.{ext}"
        random_image(start_seed + i, size=(64 + 16 * (i % 4), 48 + 8 * (i % 3))).save(path)
        paths.append(path)
    return paths


class Reference:
    """The plain transformers loop the product must equal: one image at a time, processor →
    ``generate`` → ``batch_decode`` → ``post_process_generation``."""

    def __init__(self, model_dir: Path, dtype=None):
        from transformers import AutoProcessor, Florence2ForConditionalGeneration

        self.processor = AutoProcessor.from_pretrained(model_dir)
        self.model = Florence2ForConditionalGeneration.from_pretrained(model_dir, dtype=dtype).eval()

    def run(
        self,
        image: Image.Image,
        prompt: str,
        max_new_tokens: int = MAX_NEW_TOKENS,
        num_beams: int = 3,
        task: str | None = None,
    ):
        """``task``: what post-processing is told (default: the prompt's task token; a free prompt's own
        text, as a user of a fine-tune passes it)."""
        import torch

        inputs = self.processor(text=prompt, images=image, return_tensors="pt").to(self.model.dtype)
        with torch.inference_mode():
            ids = self.model.generate(
                **inputs, max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False
            )
        raw = self.processor.batch_decode(ids, skip_special_tokens=False)[0]
        task = task or prompt[: prompt.index(">") + 1]
        return raw, self.processor.post_process_generation(raw, task=task, image_size=image.size)[task]


@pytest.fixture(scope="session")
def reference(tiny_model) -> Reference:
    return Reference(tiny_model)


@dataclass
class S3:
    """A loopback S3 endpoint (moto's server behind a proxy that injects faults) and a client of it."""

    endpoint: str
    faults: object  # tests.s3.Faults
    options: dict  # --storage-options that reach it (retries are florence-cli's alone)

    def filesystem(self):
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True, **self.options)

    def bucket(self, name: str) -> str:
        """A new empty bucket: its URL."""
        self.filesystem().mkdir(name)
        return f"s3://{name}"


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1 (a free port), with dummy credentials, for the whole session."""
    pytest.importorskip("s3fs")
    server_module = pytest.importorskip("moto.server")
    from .s3 import Faults, start_proxy

    credentials = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                   "AWS_DEFAULT_REGION": "us-east-1"}  # fmt: skip
    saved = {name: os.environ.get(name) for name in credentials}
    os.environ.update(credentials)
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    faults = Faults()
    proxy = start_proxy(server.get_host_and_port(), faults)
    endpoint = f"http://127.0.0.1:{proxy.server_address[1]}"
    # neither botocore nor s3fs retries: what is tested is florence-cli's own retrying
    options = {"endpoint_url": endpoint, "config_kwargs": {"retries": {"max_attempts": 1}}}
    yield S3(endpoint, faults, options)
    proxy.shutdown()
    server.stop()
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture
def s3(s3_server, monkeypatch):
    import s3fs

    monkeypatch.setattr(s3fs.S3FileSystem, "retries", 1)  # (a class attribute, not an option)
    s3_server.faults.clear()
    yield s3_server
    s3_server.faults.clear()
