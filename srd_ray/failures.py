"""Failures that explain themselves.

Ray wraps what goes wrong in its workers (``RayTaskError``, Ray Data's ``UserCodeException``, Ray Train's
``WorkerGroupError``), so a user would see a page of traceback naming Ray's internals. Here a failure is
turned into one message that says what happened, in which stage, and what to do:

- our own errors (a bad row, a missing signal) raised anywhere come back as themselves (exit 2);
- a worker Ray killed for memory names the stage, the node's memory, and the settings that lower it;
- anything else names the stage and the real cause (the innermost error), and that a rerun resumes.

The full traceback goes to the run's log file, not the console.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

from srd_ray.errors import SrdError

# Settings that lower each stage's memory, most effective first.
MEMORY_SETTINGS = {
    "prepare": "prepare.tiny_models sizes",
    "teacher_sft": "teacher_sft.batch_size (raise gradient_accumulation_steps to keep the batch), "
    "teacher_sft.activation_checkpointing: true, teacher_sft.strategy: fsdp",
    "reflect": "reflect.batch_size, reflect.concurrency, engine.vllm.cpu_kv_cache_gib (CPU) or "
    "engine.vllm.gpu_memory_utilization (GPU)",
    "rank": "fewer rows (data.train.max_rows)",
    "teacher_signal": "teacher_signal.batch_size, teacher_signal.concurrency, engine.vllm.cpu_kv_cache_gib",
    "distill": "distill.batch_size (raise gradient_accumulation_steps to keep the batch), "
    "distill.loss_chunk_tokens, distill.activation_checkpointing: true, distill.teacher_signal: topk (no "
    "teacher in training memory), distill.strategy: fsdp",
    "evaluate": "evaluate.batch_size, evaluate.concurrency, engine.vllm.cpu_kv_cache_gib",
}


class StageFailed(Exception):
    """A stage failed for a reason that is not the user's input (exit 1); the message says what to do."""


class InfrastructureError(Exception):
    """Storage, network or permissions failed while reading an input that may well be fine (exit 1)."""


def chain(error: BaseException) -> Iterator[BaseException]:
    """Every exception ``error`` wraps: causes, contexts, Ray's task-error causes, Ray Train's per-worker
    failures; each once."""
    seen: set[int] = set()
    pending: list[BaseException | None] = [error]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        pending += [current.__context__, current.__cause__, getattr(current, "cause", None)]
        pending += list((getattr(current, "worker_failures", None) or {}).values())


def find_srd_error(error: BaseException) -> SrdError | None:
    for current in chain(error):
        # RayTaskError(DataError) subclasses DataError but prints the remote traceback: prefer its cause.
        if isinstance(current, SrdError) and getattr(current, "cause", None) is None:
            return current
    return None


@contextmanager
def reraise_srd_error() -> Iterator[None]:
    """Where a driver waits on Ray work: our own errors raised in actors surface as themselves."""
    try:
        yield
    except Exception as error:
        found = find_srd_error(error)
        if found is None:
            raise
        raise found from None


def is_out_of_memory(error: BaseException) -> bool:
    for current in chain(error):
        if type(current).__name__ == "OutOfMemoryError" or "killed due to memory" in str(current).lower():
            return True
    return False


def node_memory(error: BaseException) -> str:
    """The node's memory as Ray's memory monitor reported it ("22.1GB / 23.5GB"), else this machine's."""
    for current in chain(error):
        found = re.search(r"(\d+(?:\.\d+)?GB / \d+(?:\.\d+)?GB)", str(current))
        if found:
            return found.group(1) + " used"
    import psutil

    memory = psutil.virtual_memory()
    return f"{memory.total / 2**30:.1f} GB on this machine"


def root_cause(error: BaseException) -> BaseException:
    """The innermost error: what actually went wrong under Ray's wrappers."""
    causes = [current for current in chain(error) if not _is_wrapper(current)]
    return causes[-1] if causes else error


def _is_wrapper(error: BaseException) -> bool:
    name = type(error).__name__
    return name.startswith(("RayTaskError", "RayActorError")) or name in (
        "UserCodeException", "WorkerGroupError", "TrainingFailedError", "ControllerError",
    )  # fmt: skip


def explain(error: BaseException, stage: str) -> BaseException:
    """The exception to show for ``error`` raised while running ``stage`` (see the module docstring)."""
    if isinstance(error, (KeyboardInterrupt, SystemExit, StageFailed, InfrastructureError)):
        return error
    found = find_srd_error(error)
    if found is not None:
        return found
    if is_out_of_memory(error):
        return StageFailed(
            f"{stage}: Ray stopped a worker that ran out of memory ({node_memory(error)}). Settings that lower "
            f"this stage's memory: {MEMORY_SETTINGS.get(stage, 'smaller batches')}. Rerun the same command to "
            "resume: finished work is kept."
        )
    cause = root_cause(error)
    message = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
    return StageFailed(
        f"{stage} failed: {type(cause).__name__}: {message}. The full traceback is in the run's logs/srd.log; "
        "finished work is kept, so rerunning the same command resumes."
    )
