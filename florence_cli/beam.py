"""Beam search whose finished images leave the batch.

transformers' beam search keeps every image of a batch in every decoding step until the last image
is done, so a batch costs as much as its longest answer times its size. This is the same search —
each step is transformers' own helpers, called in the same order on the same tensors — except that
at the end of a step, images whose answer can no longer change are stored and removed from the
batch: their beams, encoder outputs, attention mask and key/value cache rows. A batch then costs
the sum of its answers' lengths.

Why removing them changes nothing: every quantity of an image's search (its beams, scores, the
logits processors and stopping criteria below) depends on its own rows only, and once an image is
done — no running beam can beat its finished ones, or early stopping holds and all its beams are
finished — transformers freezes its finished beams. What the model computes for the images still
running does not depend on the batch around them (tests compare with the one-image loop).

Passed to ``generate(custom_generate=...)``: transformers prepares the inputs, logits processors,
stopping criteria and cache as usual and hands the decoding loop to this function. Anything outside
the plain beam search it mirrors goes back to transformers' own loop.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers.cache_utils import DynamicCache, DynamicLayer, EncoderDecoderCache
from transformers.generation import logits_process, stopping_criteria
from transformers.generation.utils import ALL_CACHE_NAMES, GENERATION_MODES_MAPPING, GenerationMode
from transformers.modeling_outputs import BaseModelOutput

from .graphs import encoder_rows

if TYPE_CHECKING:
    from .graphs import StaticDecoder

# Logits processors and stopping criteria that read nothing but the rows they are given (no state
# kept per batch position), so they give the same answer for an image wherever it sits in the batch.
ROW_LOCAL_PROCESSORS = (
    logits_process.NoRepeatNGramLogitsProcessor,
    logits_process.ForcedBOSTokenLogitsProcessor,
    logits_process.ForcedEOSTokenLogitsProcessor,
    logits_process.SuppressTokensLogitsProcessor,
    logits_process.SuppressTokensAtBeginLogitsProcessor,
    logits_process.MinLengthLogitsProcessor,
    logits_process.MinNewTokensLengthLogitsProcessor,
    logits_process.RepetitionPenaltyLogitsProcessor,
    logits_process.ExponentialDecayLengthPenalty,  # reads the step number, the same for every row
)
ROW_LOCAL_CRITERIA = (stopping_criteria.MaxLengthCriteria, stopping_criteria.EosTokenCriteria)
# Per-row model inputs the loop knows how to shrink; anything else means transformers' own loop.
KNOWN_MODEL_KWARGS = {"encoder_outputs", "attention_mask", "use_cache", "logits_to_keep", *ALL_CACHE_NAMES}


def compacting_beam_search(
    model,
    input_ids: torch.LongTensor,
    logits_processor,
    stopping_criteria,
    generation_config,
    synced_gpus: bool = False,
    static_decoder: StaticDecoder | None = None,
    shared_encoder_states: bool = False,
    **model_kwargs,
) -> torch.LongTensor:
    """Beam search as transformers runs it, with finished images dropped from the batch.
    ``static_decoder`` (a ``generate`` argument): the steps after the first run over its static cache,
    replayed from CUDA graphs on a GPU (graphs.py), where it fits the model.
    ``shared_encoder_states`` (a ``generate`` argument): the model's attention lets an image's beams read
    one row of encoder states (invariant.py's kernel does), so the encoder's outputs, their mask and the
    cross-attention cache are kept once per image, not once per beam: every beam holds the same bits, and
    a decoding step reads them once for all the beams."""
    if not _supported(
        model, logits_processor, stopping_criteria, generation_config, synced_gpus, model_kwargs
    ):
        method = getattr(model, GENERATION_MODES_MAPPING[generation_config.get_generation_mode()])
        return method(
            input_ids, logits_processor, stopping_criteria, generation_config, synced_gpus, **model_kwargs
        )
    search = _BeamSearch(model, input_ids, generation_config, model_kwargs, shared_encoder_states)
    return search.run(logits_processor, stopping_criteria, static_decoder)


def _supported(model, logits_processor, criteria, generation_config, synced_gpus, model_kwargs) -> bool:
    return (
        generation_config.get_generation_mode() == GenerationMode.BEAM_SEARCH
        and not generation_config.do_sample
        and not generation_config.return_dict_in_generate
        and not synced_gpus
        and model.config.is_encoder_decoder
        and all(isinstance(p, ROW_LOCAL_PROCESSORS) for p in logits_processor)
        and all(isinstance(c, ROW_LOCAL_CRITERIA) for c in criteria)
        and set(model_kwargs) <= KNOWN_MODEL_KWARGS
        and model_kwargs.get("encoder_outputs") is not None
    )


class _BeamSearch:
    """The state of one batched beam search: per image (rows) × beam tensors, as in transformers."""

    def __init__(
        self, model, input_ids: torch.LongTensor, config, model_kwargs: dict, shared_encoder_states: bool
    ):
        self.model = model
        self.config = config
        self.kwargs = model_kwargs
        self.num_beams = config.num_beams
        # Query rows per row of encoder states: transformers repeated each image's rows once per beam.
        self.encoder_group = self.num_beams if shared_encoder_states else 1
        if shared_encoder_states:
            # In place, as generate expanded them: the caller's reference then holds no copy per beam either.
            outputs = model_kwargs["encoder_outputs"]
            outputs.last_hidden_state = outputs.last_hidden_state[:: self.num_beams].contiguous()
            if model_kwargs.get("attention_mask") is not None:
                model_kwargs["attention_mask"] = model_kwargs["attention_mask"][:: self.num_beams]
        self.prompt_len = input_ids.shape[1]
        self.max_length = config.max_length
        rows = input_ids.shape[0] // self.num_beams
        device = input_ids.device
        eos = config._eos_token_tensor
        # K candidates per image: enough that num_beams of them are not end-of-sequence.
        self.beams_to_keep = max(2, 1 + (eos.shape[0] if eos is not None else 0)) * self.num_beams
        self.top_beam_mask = torch.arange(self.beams_to_keep, device=device) < self.num_beams
        pad = config._pad_token_tensor
        self.fill = pad or eos[0] if eos is not None else -1  # transformers' padding value, same precedence
        self.running = torch.full(
            (rows, self.num_beams, self.max_length), self.fill, dtype=torch.int64, device=device
        )
        self.running[:, :, : self.prompt_len] = input_ids.view(rows, self.num_beams, -1)
        self.finished = self.running.clone()
        self.running_scores = torch.zeros((rows, self.num_beams), dtype=torch.float, device=device)
        self.running_scores[:, 1:] = -1e9  # only the first beam's continuations count at step one
        self.finished_scores = torch.full((rows, self.num_beams), -1e9, dtype=torch.float, device=device)
        self.is_finished = torch.zeros((rows, self.num_beams), dtype=torch.bool, device=device)
        self.can_improve = torch.ones((rows, 1), dtype=torch.bool, device=device)
        self.running_origins = torch.full(
            (rows, self.num_beams, self.max_length - self.prompt_len), -1, dtype=torch.int32, device=device
        )
        self.finished_origins = self.running_origins.clone()
        self.image_of_row = torch.arange(rows, device=device)  # which input image each row still is
        self.answers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def run(
        self, logits_processor, criteria, static_decoder: StaticDecoder | None = None
    ) -> torch.LongTensor:
        model, beams = self.model, self.num_beams
        cur_len = self.prompt_len
        flat_running = self.running[:, :, :cur_len].reshape(-1, cur_len)
        outputs = model._prefill(flat_running, self.config, self.kwargs, is_first_iteration=True)
        self.steps = _CacheSteps.after(
            model, outputs, self.kwargs, beams, self.encoder_group, self.max_length, static_decoder
        )
        logits = _last_logits(outputs, self.running.device)
        del outputs  # the prefill logits can be large
        while True:
            rows = self.running.shape[0]
            log_probs = logits_processor(flat_running, nn.functional.log_softmax(logits, dim=-1))
            log_probs = log_probs.view(rows, beams, -1) + self.running_scores[:, :, None]
            top_scores, top_sequences, top_origins = model._get_top_k_continuations(
                accumulated_log_probs=log_probs.reshape(rows, -1),
                running_sequences=self.running,
                running_beam_indices=self.running_origins,
                cur_len=cur_len,
                decoder_prompt_len=self.prompt_len,
                do_sample=False,
                beams_to_keep=self.beams_to_keep,
                num_beams=beams,
                batch_size=rows,
            )
            stops = criteria(top_sequences[:, :, : cur_len + 1].reshape(rows * self.beams_to_keep, -1), None)
            stops = stops.view(rows, self.beams_to_keep)
            self.running, self.running_scores, self.running_origins = (
                model._get_running_beams_for_next_iteration(
                    topk_log_probs=top_scores,
                    topk_running_sequences=top_sequences,
                    topk_running_beam_indices=top_origins,
                    next_token_hits_stopping_criteria=stops,
                    num_beams=beams,
                )
            )
            self.finished, self.finished_scores, self.finished_origins, self.is_finished = (
                model._update_finished_beams(
                    sequences=self.finished,
                    topk_running_sequences=top_sequences,
                    beam_scores=self.finished_scores,
                    topk_log_probs=top_scores,
                    beam_indices=self.finished_origins,
                    topk_running_beam_indices=top_origins,
                    is_early_stop_heuristic_unsatisfied=self.can_improve,
                    is_sent_finished=self.is_finished,
                    next_token_hits_stopping_criteria=stops,
                    top_num_beam_mask=self.top_beam_mask,
                    num_beams=beams,
                    cur_len=cur_len,
                    decoder_prompt_len=self.prompt_len,
                    length_penalty=self.config.length_penalty,
                    early_stopping=self.config.early_stopping,
                )
            )
            self.steps.reorder(self.running_origins[..., cur_len - self.prompt_len].reshape(-1))
            cur_len += 1
            self.can_improve = model._check_early_stop_heuristic(
                is_early_stop_heuristic_unsatisfied=self.can_improve,
                running_beam_scores=self.running_scores,
                beam_scores=self.finished_scores,
                is_sent_finished=self.is_finished,
                cur_len=cur_len,
                max_length=self.max_length,
                decoder_prompt_len=self.prompt_len,
                early_stopping=self.config.early_stopping,
                length_penalty=self.config.length_penalty,
            )
            # Every candidate hitting a stopping criterion happens only at max_length (one EOS token among
            # beams_to_keep candidates can never fill them all), for all images at once, as in transformers.
            if bool(stops.all()) or not self._drop_done_images():
                break
            flat_running = self.running[:, :, :cur_len].reshape(-1, cur_len)
            logits = self.steps.logits(flat_running)
        self._store(torch.ones(self.running.shape[0], dtype=torch.bool, device=self.running.device))
        return self._output()

    def _drop_done_images(self) -> bool:
        """Store the answers of images that are done and remove their rows; False when none is left."""
        done = ~self.can_improve[:, 0]
        if self.config.early_stopping is True:
            done |= self.is_finished.all(dim=1)
        if not bool(done.any()):
            return True
        self._store(done)
        keep = (~done).nonzero().flatten()
        if len(keep) == 0:
            return False
        for name in (
            "running",
            "running_scores",
            "running_origins",
            "finished",
            "finished_scores",
            "finished_origins",
            "is_finished",
            "can_improve",
            "image_of_row",
        ):
            setattr(self, name, getattr(self, name)[keep])
        flat = (keep[:, None] * self.num_beams + torch.arange(self.num_beams, device=keep.device)).flatten()
        self.steps.select(flat)
        return True

    def _store(self, rows: torch.Tensor) -> None:
        count = self.config.num_return_sequences
        for row in rows.nonzero().flatten().tolist():
            self.answers[int(self.image_of_row[row])] = (
                self.finished[row, :count],
                self.finished_origins[row, :count],
            )

    def _output(self) -> torch.LongTensor:
        """Sequences as transformers returns them: one row per image and returned sequence, cut to the
        longest generated length and padded with the same value."""
        sequences = torch.cat([self.answers[i][0] for i in range(len(self.answers))])
        origins = torch.cat([self.answers[i][1] for i in range(len(self.answers))])
        generated = int((origins != -1).sum(dim=1).max())
        return sequences[:, : self.prompt_len + generated]


class _CacheSteps:
    """The decoding steps after the first, as transformers' loop runs them: the model's forward over
    its dynamic cache, rows reordered and dropped in that cache and in the model's inputs. The encoder's
    outputs, their mask and the cross-attention cache hold a row per ``encoder_group`` rows (per image,
    or per beam)."""

    def __init__(self, model, kwargs: dict, beams: int, encoder_group: int):
        self.model = model
        self.kwargs = kwargs
        self.encoder_group = encoder_group
        cache = self._cache()
        # The cross-attention states are written once, at the first step.
        self.cross_beams_alike = isinstance(cache, EncoderDecoderCache) and (
            encoder_group == beams or _beams_alike(cache.cross_attention_cache, beams)
        )

    @classmethod
    def after(
        cls, model, outputs, kwargs: dict, beams: int, encoder_group: int, max_length: int, static_decoder
    ):
        """The steps that follow the first step's ``outputs``: over ``static_decoder``'s static cache
        where it fits (the first step's cache then handed over to it), else transformers' own."""
        kwargs = model._update_model_kwargs_for_generation(outputs, kwargs, is_encoder_decoder=True)
        steps = cls(model, kwargs, beams, encoder_group)
        cache = steps._cache()
        if static_decoder is None or not static_decoder.fits(cache):
            return steps
        static_decoder.start(cache, kwargs.get("attention_mask"), beams, max_length, steps.cross_beams_alike)
        for name in ALL_CACHE_NAMES:
            kwargs.pop(name, None)  # its states are in the static cache now
        return static_decoder

    def _cache(self):
        return next(
            (self.kwargs[name] for name in ALL_CACHE_NAMES if self.kwargs.get(name) is not None), None
        )

    def reorder(self, beam_origins: torch.Tensor) -> None:
        """Each beam's cache rows become its parent beam's, as in transformers — except cross-attention
        rows whose beams all hold the same bits: every beam's parent is a beam of the same image, so
        that copy (the encoder's states, every layer, every step) would change nothing."""
        cache = self._cache()
        if cache is None:
            return
        if self.cross_beams_alike:
            cache.self_attention_cache.reorder_cache(beam_origins)
        else:
            cache.reorder_cache(beam_origins)

    def select(self, flat: torch.Tensor) -> None:
        """Keep the rows ``flat``: their encoder outputs, attention mask and cache."""
        encoder = encoder_rows(flat, self.encoder_group)
        encoder_states = self.kwargs["encoder_outputs"].last_hidden_state
        self.kwargs["encoder_outputs"] = BaseModelOutput(last_hidden_state=encoder_states[encoder])
        if self.kwargs.get("attention_mask") is not None:
            self.kwargs["attention_mask"] = self.kwargs["attention_mask"][encoder]
        cache = self._cache()
        if cache is not None:
            cache.self_attention_cache.batch_select_indices(flat)
            cache.cross_attention_cache.batch_select_indices(encoder)

    def logits(self, flat_running: torch.Tensor) -> torch.Tensor:
        """The next token's float32 logits for each row of ``flat_running`` (rows × tokens so far)."""
        inputs = self.model.prepare_inputs_for_generation(
            flat_running, next_sequence_length=1 if self.kwargs["use_cache"] else None, **self.kwargs
        )
        outputs = self.model(**inputs, return_dict=True)
        self.kwargs = self.model._update_model_kwargs_for_generation(
            outputs, self.kwargs, is_encoder_decoder=True
        )
        return _last_logits(outputs, flat_running.device)


def _last_logits(outputs, device: torch.device) -> torch.Tensor:
    return outputs.logits[:, -1, :].to(copy=True, dtype=torch.float32, device=device)


def _beams_alike(cache, beams: int) -> bool:
    """Whether, in every layer of a dynamic ``cache``, each image's beams hold bit-identical states."""
    if not isinstance(cache, DynamicCache) or not all(
        isinstance(layer, DynamicLayer) for layer in cache.layers
    ):
        return False
    for layer in cache.layers:
        for states in (layer.keys, layer.values):
            if states is None:
                return False
            grouped = states.view(-1, beams, *states.shape[1:])
            if not torch.equal(grouped, grouped[:, :1].expand_as(grouped)):
                return False
    return True
