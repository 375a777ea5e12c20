"""The YAML job spec: every setting of an srd-ray run, validated by pydantic.

A spec is read with ``yaml.safe_load``, patched by ``--set a.b=value`` overrides, has ``${run_dir}``
substituted in its strings, and is then validated. Validation errors name the YAML path, the bad value
and (when the value came from the file) the line, e.g.
``distill.stages[1].temperature (line 42): must be > 0, got -1``.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from srd_ray.errors import SpecError
from srd_ray.loss_settings import DEFAULT_LOSS, KD_LOSS_NAMES, TEMPERATURE_SCALINGS, LossSettings
from srd_ray.storage import absolute_path, is_uri

MINILLM_TEMPLATE_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
MINILLM_TEMPLATE_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)

# The filesystems pyarrow.fs.FileSystem.from_uri builds (output_dir may be any of them).
OUTPUT_URI_SCHEMES = ("s3", "gs", "gcs", "abfs", "abfss", "hdfs", "viewfs", "file")

PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
UnitFloat = Annotated[float, Field(ge=0, le=1)]


def resolve_local_path(text: str) -> str:
    """Make a local path absolute (Ray workers run in other directories); leave hub ids ("org/name") and
    URIs ("s3://bucket/key") as they are."""
    if is_uri(text):
        return text
    if text.startswith((".", "/", "~")) or text.count("/") >= 2 or Path(text).expanduser().exists():
        return absolute_path(text)
    return text


PathOrHubId = Annotated[str, AfterValidator(resolve_local_path)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class RunSpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    # A local path every node sees (shared storage on a cluster) or an object-store URI (s3://bucket/prefix).
    output_dir: str = "runs"
    seed: int = 0
    # Attached to a cluster that may still grow (an autoscaler, nodes joining): how long a stage waits for
    # the resources it asks for before the run stops (exit 2), naming the setting and the numbers.
    resource_timeout_s: Annotated[int, Field(ge=0)] = 600

    @field_validator("output_dir")
    @classmethod
    def _absolute(cls, value: str) -> str:
        scheme = value.split("://", 1)[0]
        if is_uri(value) and scheme not in OUTPUT_URI_SCHEMES:
            raise ValueError(
                f"{value!r}: pyarrow has no filesystem for {scheme}://; use one of "
                + ", ".join(f"{s}://" for s in OUTPUT_URI_SCHEMES)
                + " or a local path"
            )
        return normalise_output_dir(value)


class RaySpec(_Strict):
    # "local" starts a private single-machine Ray (no dashboard, Ray's token auth); any other value
    # ("auto", "ray://host:10001", "host:6379") is handed to ray.init. Under `ray job submit`
    # RAY_ADDRESS is set and always wins, so a job attaches to the cluster it runs in.
    address: str = "local"
    num_cpus: PositiveInt | None = None
    num_gpus: Annotated[int, Field(ge=0)] | None = None
    object_store_memory_mb: PositiveInt = 1024


class ModelSpec(_Strict):
    path: PathOrHubId = Field(
        min_length=1, description="Hugging Face hub id, or a save_pretrained folder: local or on an object store"
    )
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False


class LoraSpec(_Strict):
    """Train low-rank adapters (peft LoRA) instead of every student weight; the result is saved merged."""

    r: PositiveInt = 16
    alpha: PositiveFloat = 32.0
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0
    # Module names (the last part of a module path, e.g. q_proj) or "all-linear": every linear layer of
    # the decoder (never the output head, whose weights the chunked loss reads directly).
    target_modules: list[str] | Literal["all-linear"] = "all-linear"

    @field_validator("target_modules")
    @classmethod
    def _not_empty(cls, value: Any) -> Any:
        if isinstance(value, list) and not value:
            raise ValueError("name at least one module, or use all-linear")
        return value


class StudentModelSpec(ModelSpec):
    lora: LoraSpec | None = None


class TeacherModelSpec(ModelSpec):
    # The frozen teacher's weights in every pass that runs it (teacher signal, online distillation,
    # evaluation): auto = bfloat16 on GPUs (float16 on GPUs without native bf16), float32 on CPUs. Its own
    # SFT trains float32 weights under mixed precision. (Was distill.teacher_dtype, still read with a warning.)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # A peft adapter (e.g. a LoRA SFT of the teacher): merged into the teacher once per node when loaded.
    adapter: PathOrHubId | None = None


class ModelsSpec(_Strict):
    teacher: TeacherModelSpec
    student: StudentModelSpec


class FieldMapping(_Strict):
    """Column names in the source. ``None`` means: use the first of the usual names that is present."""

    id: str | None = None
    prompt: str | None = None
    instruction: str | None = None
    input: str | None = None
    response: str | None = None
    # The row's task (skill, domain, source data set): kept as a column for rank.stratify_by and for the
    # rank stage's per-task report. None: the first present of TASK_COLUMNS.
    task: str | None = None
    # A chat row's list of {role, content} messages (the last one the assistant's). None: a `messages` column
    # makes every row a chat row; without one, rows are prompt/response rows.
    messages: str | None = None


# Columns taken as a row's task when data.train.fields.task names none (Dolly: category or topic; S-NI and
# the demo data: task or topic).
TASK_COLUMNS = ("task", "topic", "category")
# rank.stratify_by's default: stratify by the data's task column when it has one.
STRATIFY_AUTO = "auto"


class DataSourceSpec(_Strict):
    path: PathOrHubId = Field(
        min_length=1,
        description="JSONL or Parquet file, folder or glob, a file or folder on an object store, or a hub dataset id",
    )
    format: Literal["auto", "jsonl", "parquet", "hub"] = "auto"
    split: str = "train"
    # Hub datasets: which files of the repository to read (datasets.load_dataset's data_files), for repos that
    # hold several formats or no split names, e.g. MiniLLM/dolly's raw.jsonl.
    data_files: str | list[str] | None = None
    fields: FieldMapping = FieldMapping()
    max_rows: PositiveInt | None = None


class DataSpec(_Strict):
    train: DataSourceSpec
    eval_sets: dict[str, DataSourceSpec] = {}
    prompt_template: str = MINILLM_TEMPLATE_WITH_INPUT
    prompt_template_no_input: str = MINILLM_TEMPLATE_NO_INPUT
    max_prompt_tokens: PositiveInt = 256
    max_response_tokens: PositiveInt = 256
    # Bad rows (empty or non-string fields, duplicate ids, over-long prompts when not truncated): stop
    # with an error naming the row, or skip them; skipped rows are counted and listed in the run manifest.
    on_bad_row: Literal["error", "skip"] = "error"
    # The SRD/MiniLLM protocol keeps the last max_prompt_tokens of a longer prompt. false: a longer prompt
    # is a bad row instead (see on_bad_row).
    truncate_long_prompts: bool = True
    # Chat rows (messages) are rendered with a chat template: `model`, each tokenizer's own, or a Jinja file
    # that replaces it; chat_template_kwargs go to every render (e.g. enable_thinking: false). Training
    # scores every assistant turn, or only the last (train_on). Prompt/response rows use prompt_template.
    chat_template: str = "model"
    chat_template_kwargs: dict[str, Any] = {}
    train_on: Literal["all_assistant_turns", "last_assistant_turn"] = "all_assistant_turns"

    @field_validator("chat_template")
    @classmethod
    def _template_file(cls, value: str) -> str:
        if value == "model" or is_uri(value):
            return value
        if not Path(value).expanduser().is_file():
            raise ValueError(f"must be 'model' or a Jinja file; {value} does not exist")
        return absolute_path(value)  # read by Ray workers, which run in other directories

    @field_validator("eval_sets", mode="before")
    @classmethod
    def _path_shorthand(cls, value: Any) -> Any:
        # `eval_sets: {dolly: path.jsonl}` is the common case; allow it as shorthand for {path: ...}.
        if isinstance(value, dict):
            return {k: {"path": v} if isinstance(v, str) else v for k, v in value.items()}
        return value


class DemoDataSpec(_Strict):
    train_rows: PositiveInt = 1200
    heldout_rows: PositiveInt = 200
    pretrain_rows: PositiveInt = 1200
    seed: int = 0
    chat: bool = False  # train and held-out rows as chat rows (messages)


class TinyModelSpec(_Strict):
    architecture: Literal["llama", "gpt2"] = "llama"
    hidden_size: PositiveInt = 64
    num_layers: PositiveInt = 2
    # hidden_size / num_heads is the head size; vLLM's CPU attention runs only head sizes 32, 64, 80, ...
    num_heads: PositiveInt = 2
    max_positions: PositiveInt = 1024
    # Causal-LM steps on the pretraining corpus: stands in for pretraining, so the student starts from a
    # partly competent model as SRD assumes (a random student gives the ranking nothing to work with).
    pretrain_steps: Annotated[int, Field(ge=0)] = 0

    @model_validator(mode="after")
    def _heads_divide_hidden(self) -> TinyModelSpec:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})")
        return self


class TinyModelsSpec(_Strict):
    vocab_size: PositiveInt = 800
    teacher: TinyModelSpec = TinyModelSpec(hidden_size=128, num_layers=4, num_heads=4)
    student: TinyModelSpec = TinyModelSpec()
    pretrain_lr: PositiveFloat = 3e-3
    pretrain_batch_size: PositiveInt = 32
    chat: bool = False  # a ChatML tokenizer: <|im_start|>/<|im_end|>, a chat template, <|im_end|> ending turns


class PrepareSpec(_Strict):
    """Inputs made on the spot: the graded demo data set and a tiny teacher/student pair."""

    demo_data: DemoDataSpec | None = None
    tiny_models: TinyModelsSpec | None = None


class GenerationSpec(_Strict):
    temperature: Annotated[float, Field(ge=0)] = 0.01
    top_k: Annotated[int, Field(ge=0)] = 0  # 0 = off
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    no_repeat_ngram_size: Annotated[int, Field(ge=0)] = 6  # 0 = off
    max_new_tokens: PositiveInt = 256
    seed: int = 10


class VllmSpec(_Strict):
    """vLLM engine settings (ignored by the transformers engine)."""

    tensor_parallel_size: PositiveInt = 1
    gpu_memory_utilization: Annotated[float, Field(gt=0, le=1)] = 0.9
    # CPU builds of vLLM size their KV cache from this instead of from GPU memory.
    cpu_kv_cache_gib: PositiveFloat = 1.0
    enforce_eager: bool = False


# An inference engine: auto is vLLM when the vllm package is importable, else transformers (resolved by
# srd_ray.auto.engine). The three passes that choose one default differently, for the reasons given there.
EngineChoice = Literal["auto", "vllm", "transformers"]


class EngineSpec(_Strict):
    """The inference engine of the passes that generate (reflect, evaluate); the teacher pass has its own
    (``teacher_signal.engine``), and so has on-policy generation (``distill.student_generation.engine``)."""

    # auto: vLLM when the vllm package is importable, else transformers. The engine actually used is
    # recorded in every shard and in run.json.
    name: EngineChoice = "auto"
    vllm: VllmSpec = VllmSpec()


class PoolSpec(_Strict):
    """A Ray Data actor pool running the engine: how many actors, and what each holds."""

    concurrency: PositiveInt = 1  # actors
    batch_size: PositiveInt = 16  # rows per engine call (the transformers engine's batch)
    num_cpus_per_actor: PositiveFloat = 1.0
    num_gpus_per_actor: Annotated[float, Field(ge=0)] = 0.0


class ReflectSpec(PoolSpec):
    shard_rows: PositiveInt = 256
    generation: GenerationSpec = GenerationSpec()
    # Also score the teacher's cross-entropy on each reference (a forward pass; for rank.signals variants).
    teacher_ce: bool = False


class TeacherSignalSpec(PoolSpec):
    """The teacher's top-k pass, run once before distillation when ``distill.teacher_signal`` is topk."""

    # Most likely tokens kept per response token; the rest is one tail bucket. adaptive: per token, the
    # fewest whose tempered mass at the hottest stage temperature reaches `coverage`, at most `max_k`
    # (a confident token keeps a few ids, an uncertain one many).
    k: PositiveInt | Literal["adaptive"] = 64
    coverage: Annotated[float, Field(gt=0, lt=1)] = 0.99
    max_k: PositiveInt = 1024
    # transformers (the default) stores the tail's exact tempered mass at each stage temperature; vLLM
    # returns only the top k, so with it the tempered tail is extrapolated (a teacher-forced pass gains
    # little from vLLM's generation machinery). auto: vllm when the vllm package is installed.
    engine: EngineChoice = "transformers"
    # Stored log-probabilities: float16 halves the storage (k * 6 + 4 bytes per response token, plus 4
    # per stage temperature other than 1 for the tempered tail).
    logprob_dtype: Literal["float16", "float32"] = "float16"
    shard_rows: PositiveInt = 256

    @model_validator(mode="after")
    def _adaptive_needs_the_full_distribution(self) -> TeacherSignalSpec:
        if self.k == "adaptive" and self.engine != "transformers":
            raise ValueError(
                "k adaptive picks each token's ids from the teacher's whole distribution, which only the "
                f"transformers engine has (vLLM returns a fixed top k): use engine transformers, not {self.engine}"
            )
        return self

    @property
    def largest_k(self) -> int:
        """The most ids stored for one token."""
        return self.max_k if self.k == "adaptive" else self.k

    @property
    def coverage_or_none(self) -> float | None:
        return self.coverage if self.k == "adaptive" else None


CLUSTER_COLUMN = "cluster"  # where rank.stratify_clusters writes each row's cluster


class RankSignal(_Strict):
    name: Literal["rouge_l", "student_ce", "teacher_ce"]
    easier_when: Literal["higher", "lower"]


class RankSpec(_Strict):
    k: Annotated[int, Field(ge=0)] = 60
    # Fused in this order: each signal's stable sort starts from the previous signal's sorted list.
    signals: list[RankSignal] = Field(
        default_factory=lambda: [
            RankSignal(name="rouge_l", easier_when="higher"),
            RankSignal(name="student_ce", easier_when="lower"),
        ],
        min_length=1,
    )
    # Ablations: hard_to_easy reverses the curriculum; random ignores difficulty (seeded by run.seed).
    order: Literal["easy_to_hard", "hard_to_easy", "random"] = "easy_to_hard"
    num_buckets: PositiveInt = 4
    keep_buckets: PositiveInt = 3
    # once: difficulty is measured by the untrained student only (the release). every_stage: after each
    # distill stage but the last, the student as trained so far re-reflects the rows not yet admitted, and
    # the next bucket is the easiest 1/num_buckets of all rows among them (see srd_ray.refresh).
    refresh: Literal["once", "every_stage"] = "once"
    # Rank within strata instead of over all rows, so that no stratum (task) is dropped whole: each stratum
    # is ranked on its own and split into near-equal parts, bucket b being every stratum's part b (see
    # srd_ray.rank). stratify_by: a scalar column of the training data (e.g. task, topic, category);
    # auto (the default): the data's task column (data.train.fields.task, else the first present of
    # TASK_COLUMNS) if it has one, else a global ranking; null: the release's exact global ranking (a
    # global ranking drops whole tasks where difficulty follows the task: bench/results/srd_evidence_*.md).
    # stratify_clusters: N clusters of the training prompts (TF-IDF + k-means), for data without a task
    # column.
    stratify_by: str | None = STRATIFY_AUTO
    stratify_clusters: Annotated[int, Field(ge=2)] | None = None

    @model_validator(mode="after")
    def _one_stratification(self) -> RankSpec:
        if self.stratify_by not in (None, STRATIFY_AUTO) and self.stratify_clusters is not None:
            raise ValueError(
                f"stratify_by ({self.stratify_by!r}) and stratify_clusters ({self.stratify_clusters}) both set: "
                "strata come from a column or from clusters, not both"
            )
        return self

    def for_task_column(self, task_column: str | None) -> RankSpec:
        """This spec with ``stratify_by: auto`` resolved against the data, whose task column is
        ``task_column`` (None: it has none, and the ranking is global; so it is with clusters)."""
        if self.stratify_by != STRATIFY_AUTO:
            return self
        return self.model_copy(update={"stratify_by": None if self.stratify_clusters is not None else task_column})

    @property
    def strata_column(self) -> str | None:
        """The column the ranking is stratified by (clusters are written as ``cluster``), or None. A spec
        still holding ``auto`` (not resolved by :meth:`for_task_column`) ranks globally."""
        if self.stratify_clusters is not None:
            return CLUSTER_COLUMN
        return None if self.stratify_by == STRATIFY_AUTO else self.stratify_by

    @model_validator(mode="after")
    def _keep_fits(self) -> RankSpec:
        if self.keep_buckets > self.num_buckets:
            raise ValueError(f"keep_buckets ({self.keep_buckets}) must be <= num_buckets ({self.num_buckets})")
        if self.refresh == "every_stage" and self.order != "easy_to_hard":
            raise ValueError(
                f"refresh every_stage admits the easiest rows left at each stage; order {self.order} has no "
                "easiest rows to admit: use order easy_to_hard or refresh once"
            )
        return self


class StageSpec(_Strict):
    epochs: PositiveInt = 8
    # Optimizer steps for this stage instead of whole epochs (the pool is reshuffled each pass).
    steps: PositiveInt | None = None
    kd_weight: UnitFloat = 1.0
    temperature: PositiveFloat = 1.0
    lr: PositiveFloat = 1e-4


def _srd_release_stages() -> list[StageSpec]:
    return [
        StageSpec(kd_weight=0.8, temperature=1.0),
        StageSpec(kd_weight=0.9, temperature=1.5),
        StageSpec(kd_weight=1.0, temperature=2.0),
    ]


class MetricsSpec(_Strict):
    """Where training metrics also go; ``metrics.jsonl`` in the stage folder always gets them."""

    tensorboard: bool = False  # event files in <stage dir>/tensorboard (local or shared run directories)
    mlflow: bool = False  # an MLflow run per training stage, in the experiment named after run.name
    # Default: an SQLite store in the run directory (mlflow/mlflow.db); or a server, e.g. http://mlflow:5000.
    mlflow_tracking_uri: str | None = None


class TrainingSpec(_Strict):
    """Optimisation settings shared by teacher SFT and distillation."""

    num_workers: PositiveInt = 2
    use_gpu: bool = False
    # ddp: a full student and teacher per worker. fsdp: both sharded layer by layer across workers, for
    # pairs that do not fit one GPU (see srd_ray/distill/parallel.py).
    strategy: Literal["ddp", "fsdp"] = "ddp"
    num_cpus_per_worker: PositiveFloat = 1.0
    batch_size: PositiveInt = 8  # per worker, per micro-batch
    gradient_accumulation_steps: PositiveInt = 1
    max_grad_norm: PositiveFloat = 1.0
    weight_decay: Annotated[float, Field(ge=0)] = 0.01
    min_lr: Annotated[float, Field(ge=0)] = 1e-7
    log_every_steps: PositiveInt = 10
    # auto: bf16-mixed on GPU workers, fp32 on CPU. Mixed = fp32 master weights and optimizer, autocast
    # compute (FSDP: bf16/fp16 parameters in compute, fp32 gradient reduction).
    precision: Literal["auto", "bf16-mixed", "fp16-mixed", "fp32"] = "auto"
    # Recompute each decoder layer's activations in the backward pass: less memory, ~1/3 more compute.
    activation_checkpointing: bool = False
    # Response tokens per chunk of the loss: logits exist for one chunk at a time, a few [chunk, vocab] fp32
    # tensors (64 x 151,936 x 4 B = 39 MB each). Larger chunks launch fewer kernels and take more memory.
    loss_chunk_tokens: PositiveInt = 64
    # Micro-batches of rows of similar length (within each epoch's shuffled order): less padding.
    group_by_length: bool = True
    # Logged metrics always go to metrics.jsonl and the log. true: also ray.train.report them at every log
    # step (for Ray's own metric consumers); each report is a barrier costing ~2 s in Ray 2.60.
    report_every_log_step: bool = False
    # Checkpoints are always written at the end of each stage; also every N optimizer steps if set.
    checkpoint_every_steps: PositiveInt | None = None
    # Checkpoints kept (the newest); older ones are deleted as new ones are written.
    keep_checkpoints: PositiveInt = 2
    # Times a failed worker group is restarted from the last checkpoint before the stage fails.
    max_failures: Annotated[int, Field(ge=0)] = 2
    metrics: MetricsSpec = MetricsSpec()


class TeacherSftSpec(TrainingSpec):
    enabled: bool = False
    epochs: PositiveInt = 3
    lr: PositiveFloat = 1e-4


def _yaml_on_off(value: Any) -> Any:
    """YAML 1.1 reads an unquoted ``on`` / ``off`` as true / false: a choice with those values takes them."""
    return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value


class StudentGenerationSpec(PoolSpec):
    """Student-generated responses during distillation (GKD, DistiLLM): see srd_ray/distill/student_generation.py.

    off: train on the references. on: every step trains on the current student's samples. mixed (GKD): with
    probability mixed_alpha a step's samples go to a replay buffer and a batch drawn from the buffer is
    trained on; otherwise the references. adaptive (DistiLLM): a threshold schedule (replay_ratio) chooses
    between fresh samples, the buffer and the references. The pool settings (concurrency, num_cpus_per_actor,
    num_gpus_per_actor, batch_size) size the vLLM generation actors."""

    mode: Annotated[Literal["off", "on", "mixed", "adaptive"], BeforeValidator(_yaml_on_off)] = "off"
    mixed_alpha: UnitFloat = 0.5
    replay_capacity: PositiveInt = 1000  # rows
    init_threshold: UnitFloat = 0.5
    # The adaptive threshold over training: decreasing (default), constant or increasing.
    replay_ratio: Literal["decreasing", "constant", "increasing"] = "decreasing"
    generation_temperature: PositiveFloat = 1.0
    # vllm: generation actors holding a copy of the student, updated every sync_every_steps optimizer
    # steps. transformers: each training worker samples its own rows with the model it trains (the SRD
    # release's way). auto: vllm when the vllm package is installed.
    engine: EngineChoice = "auto"
    sync_every_steps: PositiveInt = 1


class DistillSpec(TrainingSpec):
    loss: Literal[KD_LOSS_NAMES] = DEFAULT_LOSS.name  # type: ignore[valid-type]
    # srd: stage s trains on buckets 0..s. none: every stage trains on all rows (the matched KD baseline).
    curriculum: Literal["srd", "none"] = "srd"
    stages: list[StageSpec] = Field(default_factory=_srd_release_stages, min_length=1)
    temperature_scaling: Literal[TEMPERATURE_SCALINGS] = DEFAULT_LOSS.temperature_scaling  # type: ignore[valid-type]
    jsd_beta: UnitFloat = DEFAULT_LOSS.jsd_beta
    skew_alpha: UnitFloat = DEFAULT_LOSS.skew_alpha
    # true (the SRD release): each stage gets a fresh AdamW and its own cosine schedule from its lr.
    # false: one optimizer and one cosine schedule over all stages, from stages[0].lr.
    reset_optimizer_each_stage: bool = True
    # online: the teacher runs in every training step. topk: its top-k distributions are computed once by the
    # teacher_signal stage (see the teacher_signal section) and no teacher is loaded for training.
    teacher_signal: Literal["online", "topk"] = "online"
    # KD loss (T = 1) on held-out rows before training and after each stage: the eval set to take them
    # from (default: the first of data.eval_sets; none when there are no eval sets), and how many.
    heldout_eval_set: str | None = None
    heldout_rows: PositiveInt = 64
    student_generation: StudentGenerationSpec = StudentGenerationSpec()

    @model_validator(mode="after")
    def _generation_has_a_teacher(self) -> DistillSpec:
        mode = self.student_generation.mode
        if mode != "off" and self.loss == "sft":
            raise ValueError(
                f"student_generation.mode is {mode}, which distils from the teacher on the student's samples, "
                "but distill.loss is sft (no teacher): choose a KD loss or mode off"
            )
        if mode != "off" and self.teacher_signal == "topk":
            raise ValueError(
                f"student_generation.mode is {mode}, but teacher_signal topk stores the teacher's distribution "
                "on the references only: use teacher_signal online (the teacher scores each sample)"
            )
        return self

    @property
    def loss_settings(self) -> LossSettings:
        return LossSettings(self.loss, self.temperature_scaling, self.jsd_beta, self.skew_alpha)


class LmEvalSpec(_Strict):
    """Standard benchmarks beside ROUGE-L: EleutherAI's lm-evaluation-harness (``pip install
    'srd-ray[lmeval]'``) on each evaluated model, one Ray task per model with evaluate's per-actor CPUs and
    GPUs. Task names are lm-eval's (e.g. ifeval, gsm8k), or tasks defined by YAML files in
    ``include_path``."""

    tasks: list[str] = Field(min_length=1)
    num_fewshot: Annotated[int, Field(ge=0)] | None = None  # None: each task's own default
    limit: PositiveFloat | None = None  # rows per task (a number), or a fraction of them (below 1)
    batch_size: PositiveInt = 8
    include_path: str | None = None  # a folder of task YAML files (custom tasks, local data)
    # auto: vLLM where it is installed and the model gets GPUs, else transformers (lm-eval's "hf").
    backend: Literal["auto", "vllm", "hf"] = "auto"
    apply_chat_template: bool = False  # render few-shot prompts with the model's chat template
    seed: int = 1234

    @field_validator("include_path")
    @classmethod
    def _task_folder(cls, value: str | None) -> str | None:
        return value if value is None or is_uri(value) else absolute_path(value)


class EvaluateSpec(PoolSpec):
    # Which models to score: the (fine-tuned) teacher, the student before and after distillation.
    models: list[Literal["teacher", "student_before", "student_after"]] = [
        "teacher",
        "student_before",
        "student_after",
    ]
    seeds: list[int] = Field(default=[10, 20, 30, 40, 50], min_length=1)
    max_examples: PositiveInt | None = None
    batch_size: PositiveInt = 32
    generation: GenerationSpec = GenerationSpec(temperature=1.0)
    lm_eval: LmEvalSpec | None = None  # standard benchmarks on the same models (the lm_eval stage)


class JobSpec(_Strict):
    run: RunSpec
    ray: RaySpec = RaySpec()
    models: ModelsSpec
    data: DataSpec
    prepare: PrepareSpec = PrepareSpec()
    engine: EngineSpec = EngineSpec()
    teacher_sft: TeacherSftSpec = TeacherSftSpec()
    reflect: ReflectSpec = ReflectSpec()
    rank: RankSpec = RankSpec()
    teacher_signal: TeacherSignalSpec = TeacherSignalSpec()
    distill: DistillSpec = DistillSpec()
    evaluate: EvaluateSpec = EvaluateSpec()

    @model_validator(mode="before")
    @classmethod
    def _moved_settings(cls, data: Any) -> Any:
        """``distill.teacher_dtype`` became ``models.teacher.dtype`` (one setting for every pass that runs the
        teacher): an old spec still validates, with a warning, its value moved where ``models.teacher``
        does not set a dtype of its own."""
        distill = data.get("distill") if isinstance(data, dict) else None
        if not isinstance(distill, dict) or "teacher_dtype" not in distill:
            return data
        value = distill["teacher_dtype"]
        data = {**data, "distill": {k: v for k, v in distill.items() if k != "teacher_dtype"}}
        models = data.get("models")
        teacher = models.get("teacher") if isinstance(models, dict) else None
        kept = isinstance(teacher, dict) and "dtype" in teacher
        if isinstance(teacher, dict) and not kept:
            data["models"] = {**models, "teacher": {**teacher, "dtype": value}}
        where = "which this spec also sets, and which wins" if kept else f"now {value}"
        message = f"models.teacher.dtype ({where}), which applies to every pass that runs the teacher"
        warnings.warn(f"distill.teacher_dtype is deprecated: set {message}", FutureWarning, stacklevel=2)
        return data

    @model_validator(mode="after")
    def _lm_eval_tasks_exist(self) -> JobSpec:
        """A folder of lm-eval tasks must exist, unless the run's prepare stage writes it (the demo data's)."""
        folder = self.evaluate.lm_eval.include_path if self.evaluate.lm_eval else None
        if folder is None or is_uri(folder) or Path(folder).is_dir():
            return self
        if self.prepare.demo_data is not None and Path(folder).is_relative_to(Path(self.run_dir) / "prepare"):
            return self
        raise ValueError(
            f"evaluate.lm_eval.include_path must be a folder of lm-eval task YAML files; {folder} is not a folder"
        )

    @model_validator(mode="after")
    def _gpus_cover_tensor_parallel(self) -> JobSpec:
        tensor_parallel = self.engine.vllm.tensor_parallel_size
        for section in ("reflect", "teacher_signal", "evaluate"):
            gpus = getattr(self, section).num_gpus_per_actor
            if tensor_parallel > 1 and gpus < tensor_parallel:
                raise ValueError(
                    f"engine.vllm.tensor_parallel_size is {tensor_parallel}: each actor needs "
                    f"{section}.num_gpus_per_actor >= {tensor_parallel}, got {gpus}"
                )
        return self

    @model_validator(mode="after")
    def _heldout_set_exists(self) -> JobSpec:
        name = self.distill.heldout_eval_set
        if name is not None and name not in self.data.eval_sets:
            known = ", ".join(self.data.eval_sets) or "none"
            raise ValueError(f"distill.heldout_eval_set {name!r} is not in data.eval_sets (have: {known})")
        return self

    @model_validator(mode="after")
    def _teacher_ce_is_reflected(self) -> JobSpec:
        if any(signal.name == "teacher_ce" for signal in self.rank.signals) and not self.reflect.teacher_ce:
            raise ValueError("rank.signals uses teacher_ce, which reflect computes only with reflect.teacher_ce: true")
        return self

    @model_validator(mode="after")
    def _refresh_has_a_curriculum(self) -> JobSpec:
        if self.rank.refresh == "every_stage" and self.distill.curriculum != "srd":
            raise ValueError(
                "rank.refresh every_stage re-ranks between curriculum stages: it needs distill.curriculum srd"
            )
        return self

    @model_validator(mode="after")
    def _mlflow_store_reaches_the_run(self) -> JobSpec:
        for section in ("teacher_sft", "distill"):
            metrics = getattr(self, section).metrics
            if metrics.mlflow and metrics.mlflow_tracking_uri is None and is_uri(self.run.output_dir):
                raise ValueError(
                    f"{section}.metrics.mlflow on a run directory on an object store ({self.run.output_dir}) needs "
                    f"{section}.metrics.mlflow_tracking_uri (a tracking server): the default SQLite file would "
                    "sit on one node's disk"
                )
        return self

    @model_validator(mode="after")
    def _stages_have_buckets(self) -> JobSpec:
        if self.distill.curriculum == "srd" and len(self.distill.stages) > self.rank.keep_buckets:
            raise ValueError(
                f"distill.stages has {len(self.distill.stages)} stages but rank.keep_buckets is "
                f"{self.rank.keep_buckets}: stage s trains on buckets 0..s, so stage "
                f"{self.rank.keep_buckets} would need a bucket that is not kept"
            )
        return self

    @property
    def run_dir(self) -> str:
        """``<output_dir>/<run name>``: a local path or an object-store URI."""
        return join_run_dir(self.run.output_dir, self.run.name)

    def section_fingerprint(self, *sections: str) -> str:
        """A short hash of the named sections, used to tell whether a finished stage is still valid."""
        payload = {name: self._section(name) for name in sections}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def _section(self, dotted: str) -> Any:
        value: Any = self.model_dump(mode="json")
        for part in dotted.split("."):
            value = value[part]
        return value


# --------------------------------------------------------------------------------------------------------
# Loading


def load_spec(path: str | os.PathLike, overrides: list[str] | None = None) -> JobSpec:
    """Read, override, interpolate and validate a YAML job spec. Raises SpecError with readable lines."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(f"{path}: spec file not found") from None
    except UnicodeDecodeError as error:
        raise SpecError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    try:
        raw = yaml.safe_load(text)
        root_node = yaml.compose(text)
    except yaml.YAMLError as error:
        raise SpecError(f"{path}: malformed YAML: {error}") from None
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: a job spec is a YAML mapping with sections run, models, data, ...")
    for override in overrides or []:
        apply_override(raw, override)
    raw = _interpolate(raw, run_dir=_raw_run_dir(raw))
    try:
        return JobSpec.model_validate(raw)
    except ValidationError as error:
        raise SpecError(format_validation_error(error, path, root_node)) from None


def apply_override(raw: dict, override: str) -> None:
    """Apply ``a.b.c=value`` (value parsed as YAML, so numbers, booleans and lists work)."""
    key, sep, value = override.partition("=")
    if not sep or not key:
        raise SpecError(f"--set {override!r}: expected KEY=VALUE, e.g. distill.num_workers=1")
    parts = key.split(".")
    target = raw
    for part in parts[:-1]:
        if isinstance(target, list):
            if not part.isdigit() or int(part) >= len(target):
                raise SpecError(f"--set {override!r}: {part} is not an index of a {len(target)}-item list")
            target = target[int(part)]
            continue
        if part.isdigit():
            raise SpecError(f"--set {override!r}: the list is not in the spec file; set the whole list instead")
        target = target.setdefault(part, {})
        if not isinstance(target, dict | list):
            raise SpecError(f"--set {override!r}: {part} is not a section")
    leaf = parts[-1]
    parsed = yaml.safe_load(value) if value else ""
    if isinstance(target, list) and leaf.isdigit():
        target[int(leaf)] = parsed
    else:
        target[leaf] = parsed


def _raw_run_dir(raw: dict) -> str:
    run = raw.get("run") if isinstance(raw.get("run"), dict) else {}
    return join_run_dir(normalise_output_dir(str(run.get("output_dir", "runs"))), str(run.get("name", "")))


def normalise_output_dir(value: str) -> str:
    """A local output_dir made absolute (Ray workers run elsewhere); a URI without a trailing slash."""
    return value.rstrip("/") if is_uri(value) else absolute_path(value)


def join_run_dir(output_dir: str, name: str) -> str:
    return f"{output_dir.rstrip('/')}/{name}"


def _interpolate(value: Any, run_dir: str) -> Any:
    if isinstance(value, str):
        return value.replace("${run_dir}", run_dir)
    if isinstance(value, dict):
        return {k: _interpolate(v, run_dir) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, run_dir) for v in value]
    return value


_MESSAGES = {
    "greater_than": "must be > {gt}",
    "greater_than_equal": "must be >= {ge}",
    "less_than": "must be < {lt}",
    "less_than_equal": "must be <= {le}",
    "extra_forbidden": "unknown key",
    "missing": "required key is missing",
    "literal_error": "must be one of {expected}",
    "too_short": "needs at least {min_length} item(s)",
    "string_too_short": "must not be empty",
    "string_pattern_mismatch": "must match {pattern}",
}


def format_validation_error(error: ValidationError, path: Path, root_node: yaml.Node | None) -> str:
    lines = [f"{path}: invalid job spec ({error.error_count()} problem(s))"]
    for item in error.errors():
        loc = [part for part in item["loc"] if part not in ("function-after", "function-before")]
        dotted = _dotted(loc) or "(top level)"
        line = _yaml_line(root_node, loc)
        where = f"{dotted} (line {line})" if line else dotted
        template = _MESSAGES.get(item["type"])
        context = {k: int(v) if isinstance(v, float) and v.is_integer() else v for k, v in item.get("ctx", {}).items()}
        message = template.format(**context) if template else item["msg"]
        if item["type"] == "value_error":
            message = item["msg"].removeprefix("Value error, ")
        shown = "" if item["type"] in ("missing", "value_error") else f", got {item['input']!r}"
        if item["type"] == "extra_forbidden":
            shown = ""
        lines.append(f"  {where}: {message}{shown}")
    return "\n".join(lines)


def _dotted(loc: list) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _yaml_line(node: yaml.Node | None, loc: list) -> int | None:
    """The 1-based line of the YAML node at ``loc``, or of its deepest existing ancestor."""
    found = None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = next(((k, v) for k, v in node.value if k.value == part), None)
            if match is None:
                break
            found, node = match[0], match[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            found = node
        else:
            break
    return found.start_mark.line + 1 if found is not None else None


def dump_spec(spec: JobSpec) -> str:
    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
