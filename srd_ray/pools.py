"""One Ray Data actor-pool builder for every pass that runs an inference engine: reflection, the teacher's
top-k pass and evaluation. Each actor loads its engine once (``actor(**actor_kwargs)``) and is then called
with batches of rows; ``pool`` (a spec section) says how many actors and what each holds."""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from srd_ray.spec import PoolSpec


def map_with_engine_actors(
    rows: pa.Table | list[pa.Table],
    actor: type,
    actor_kwargs: dict[str, Any],
    pool: PoolSpec,
    *,
    engine: str,
    batch_size: int | None,
) -> Any:
    """A Ray dataset of ``actor``'s outputs over ``rows`` (one block per table). ``batch_size=None`` asks
    for whole blocks per call (e.g. one shard each): the batch size is then the largest block's rows,
    since Ray Data refuses ``batch_size=None`` for actors that ask for GPUs; equal blocks then arrive one
    per call, and a caller that needs whole blocks must still tolerate a block split over two calls (see
    ``srd_ray.shards``). ``engine`` (a resolved engine name) sets how many calls an actor takes at once."""
    import ray

    from srd_ray.engines import calls_in_flight

    blocks = rows if isinstance(rows, list) else [rows]
    # Whole blocks per call: no more actors than blocks to hand out.
    actors = min(pool.concurrency, len(blocks)) if batch_size is None else pool.concurrency
    return ray.data.from_arrow(blocks).map_batches(
        actor,
        # Settings travel as pydantic objects (they pickle), never as dicts to re-validate.
        fn_constructor_kwargs=actor_kwargs,
        batch_size=batch_size or max(block.num_rows for block in blocks),
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(
            size=max(1, actors),
            max_concurrent_calls_per_actor=calls_in_flight(engine),
            enable_true_multi_threading=calls_in_flight(engine) > 1,
        ),
        num_cpus=pool.num_cpus_per_actor,
        num_gpus=pool.num_gpus_per_actor,
    )
