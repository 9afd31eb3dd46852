"""Stage 4: a batch of decoded images in, every job of every image answered out.

A ``BatchAnswerer`` holds a loaded model and what a batch needs to survive: a CUDA out-of-memory error
halves the batch (for the rest of the run too) and retries, an error of the device itself (a kernel that
cannot compile or launch, a CUDA error) stops the run at once (``DeviceFailure``: no image is guilty of
it), and any other error splits the batch until only the guilty image fails — no image is lost or
skipped. Engines are handed an ``AnswererBuilder`` and build the answerer where the model runs: in this
process, or in each Ray replica (as clip-retrieval's workers receive a mapper builder). Importing this
module imports no torch: the builder does, where the model runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .config import RunConfig
from .decode import DecodedImage, ResizeSpec
from .device_errors import DeviceFailure, device_failure, is_out_of_memory
from .parse import TokenText, parse_answer
from .postconfig import BANNED_GROUNDING_PHRASES
from .records import Answer, ImageFailure
from .tasks import Output

if TYPE_CHECKING:
    from .model import FlorenceModel


class BatchAnswerer:
    """A loaded model answering batches of decoded images, each with its jobs."""

    def __init__(self, model: FlorenceModel, config: RunConfig):
        self.model = model
        self.batch_size = config.batch_size_on(model.device.type)  # shrinks after out-of-memory
        self.generation = config.generation.kwargs()
        self.min_score = config.min_score
        post = getattr(model.processor, "post_processor_config", None) or {}
        banned = post.get("phrase_grounding", {}).get("banned_grounding_tokens", BANNED_GROUNDING_PHRASES)
        self.banned_phrases = frozenset(banned)

    @property
    def resize_spec(self) -> ResizeSpec:
        """How decode workers must resize images for this model."""
        return self.model.resize_spec

    def answer(self, images: list[DecodedImage]) -> list[list[Answer]]:
        """Answer every job of every image, in job order. Image features are computed once per image;
        jobs at the same position run as one batch, so a chained job sees the answers before it."""
        model = self.model
        features = model.image_features(model.pixel_values([image.pixels for image in images]))
        answers: list[list[Answer]] = [[] for _ in images]
        texts: list[dict[str, str]] = [{} for _ in images]  # each image's text answers so far
        for position in range(max(len(image.ref.jobs) for image in images)):
            rows = [i for i, image in enumerate(images) if position < len(image.ref.jobs)]
            jobs = [images[i].ref.jobs[position] for i in rows]
            prompts = [
                job.prompt(images[i].width, images[i].height, texts[i])
                for i, job in zip(rows, jobs, strict=True)
            ]
            # Only located answers carry scores; a text answer would pay a scoring pass for nothing.
            located = [job.task.output is not Output.TEXT for job in jobs]
            generated = model.generate(features[rows], prompts, self.generation, with_scores=located)
            for i, job, output in zip(rows, jobs, generated, strict=True):
                tokens = TokenText.from_tokens(model.tokenizer, output.token_ids, output.token_logprobs)
                image = images[i]
                answer = parse_answer(
                    job.task, output.text, image.width, image.height, tokens, self.banned_phrases
                )
                for instance in answer.instances:
                    instance.category = job.category
                if self.min_score is not None:
                    answer.instances = [x for x in answer.instances if (x.score or 0.0) >= self.min_score]
                if answer.text is not None:
                    texts[i][job.task.name] = answer.text
                answers[i].append(answer)
        return answers

    def answer_safely(self, images: list[DecodedImage]) -> list[list[Answer] | ImageFailure]:
        """``answer``, but a batch that fails is split until only the guilty images fail; a CUDA
        out-of-memory error halves the batch and retries, so no image is lost or skipped. The device's
        own errors raise ``DeviceFailure`` at once: every retry would fail alike."""
        try:
            return list(self.answer(images))
        except Exception as exc:  # an error on one image must not lose the batch
            if is_out_of_memory(exc):
                _release_cuda_cache()
                self.batch_size = max(1, min(self.batch_size, len(images) // 2))
            elif (failure := device_failure(exc)) is not None:
                raise DeviceFailure(failure) from exc
            if len(images) == 1:
                reason = str(exc).strip().splitlines()[0] if str(exc).strip() else "an error with no message"
                return [ImageFailure(images[0].ref.name, f"generation failed: {reason}")]
            half = len(images) // 2
            return self.answer_safely(images[:half]) + self.answer_safely(images[half:])


@dataclass(frozen=True)
class AnswererBuilder:
    """Builds a ``BatchAnswerer`` where it is used, from a run's configuration (picklable: each Ray
    replica builds its own, on the device it was given)."""

    config: RunConfig

    def __call__(self, device: str | None = None) -> BatchAnswerer:
        from .model import FlorenceModel  # torch: only where the model runs

        model = self.config.model
        loaded = FlorenceModel.load(
            model.name, device or model.device, model.dtype, model.allow_pickle,
            products=model.products, cuda_graphs=model.cuda_graphs,
        )  # fmt: skip
        return BatchAnswerer(loaded, self.config)


def _release_cuda_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
