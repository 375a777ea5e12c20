"""Local storage: folders replaced without a gap, per-node caches built once, paths that keep symlinks."""

from __future__ import annotations

import multiprocessing
import os
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

from srd_ray import storage
from srd_ray.spec import load_spec


def test_a_folder_is_replaced_whole_and_kept_when_the_replacement_fails(tmp_path, monkeypatch):
    """Review C3: the old folder is renamed aside, not deleted, until the new one is in place."""
    target = tmp_path / "model"
    with storage.directory(target) as scratch:
        (scratch / "weights").write_text("old")
    with storage.directory(target) as scratch:
        (scratch / "weights").write_text("new")
    assert (target / "weights").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"], "nothing left aside"

    real_replace = os.replace

    def failing_replace(source, destination):
        if ".partial" in str(source) and ".old" not in str(source):
            raise OSError("disk full")
        return real_replace(source, destination)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"), storage.directory(target) as scratch:
        (scratch / "weights").write_text("newer")
    assert (target / "weights").read_text() == "new", "the old folder is back in place"


def test_a_parquet_file_appears_whole_or_not_at_all(tmp_path, monkeypatch):
    """Parquet is streamed to a partial file renamed into place: a writer that fails midway leaves neither
    the file nor its partial, and the file that was there before stays."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    target = tmp_path / "shards" / "shard-00000.parquet"
    old = pa.table({"example_id": ["a"]})
    storage.write_parquet(target, old)
    real_write = pq.write_table

    def dies_midway(table, where, **options):
        where.write(b"PAR1 half a file")
        raise OSError("disk full")

    monkeypatch.setattr(pq, "write_table", dies_midway)
    with pytest.raises(OSError, match="disk full"):
        storage.write_parquet(target, pa.table({"example_id": ["b", "c"]}))
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name], "no partial left"
    assert pq.read_table(target).equals(old)
    monkeypatch.setattr(pq, "write_table", real_write)
    storage.write_parquet(target, new := pa.table({"example_id": ["b", "c"]}), row_group_size=1)
    assert pq.read_table(target).equals(new) and pq.ParquetFile(target).num_row_groups == 2


def _build_once(cache: str, log: str) -> None:
    os.environ["SRD_CACHE_DIR"] = cache

    def build(scratch: Path) -> None:
        with open(log, "a") as handle:
            handle.write(f"{os.getpid()}\n")
        time.sleep(0.5)  # long enough that the others arrive while it builds
        (scratch / "merged.safetensors").write_text("weights")

    folder = storage.cached_folder("merged", "teacher", ["base", "adapter"], build)
    assert (folder / "merged.safetensors").read_text() == "weights"


def test_workers_on_one_node_build_a_cached_folder_once(tmp_path):
    """Review F11: four workers ask for the same merged teacher at once; one builds, the others wait."""
    log = tmp_path / "builds.log"
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_build_once, args=(str(tmp_path / "cache"), str(log))) for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
    assert [worker.exitcode for worker in workers] == [0, 0, 0, 0]
    assert len(log.read_text().splitlines()) == 1


def test_paths_keep_the_symlinks_they_were_given(tmp_path):
    """Review F19: a mount reached through a link on the driver is the path the workers are given."""
    (tmp_path / "fsx").mkdir()
    (tmp_path / "mnt").symlink_to(tmp_path / "fsx")
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(
        f"run: {{name: r, output_dir: {tmp_path / 'mnt' / 'runs'}}}\n"
        f"models: {{teacher: {{path: {tmp_path / 'mnt' / 't'}}}, student: {{path: {tmp_path / 'mnt' / 's'}}}}}\n"
        f"data: {{train: {{path: {tmp_path / 'mnt' / 'train.jsonl'}}}}}\n"
    )
    spec = load_spec(spec_path)
    assert spec.run.output_dir == str(tmp_path / "mnt" / "runs")
    assert spec.models.teacher.path == str(tmp_path / "mnt" / "t")
    assert storage.Location.of(tmp_path / "mnt" / "x" / ".." / "y").path == str(tmp_path / "mnt" / "y")


# --------------------------------------------------------------------------------------------------------
# The run directory's lease (review C2)


def minimal_spec(tmp_path: Path):
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(
        f"run: {{name: leased, output_dir: {tmp_path / 'runs'}}}\n"
        "models: {teacher: {path: /m/t}, student: {path: /m/s}}\ndata: {train: {path: /d/train.jsonl}}\n"
    )
    return load_spec(spec_path)


def test_a_second_driver_on_a_run_directory_is_refused_by_name(tmp_path):
    import socket

    from srd_ray.errors import RunDirError
    from srd_ray.run_dir import LEASE, RunDirectory

    spec = minimal_spec(tmp_path)
    first = RunDirectory(spec)
    with first.lease():
        first.start("reflect", "f1")  # what the holder writes while it runs
        second = RunDirectory(spec)
        holder = rf"in use by srd \(pid {os.getpid()} on {socket.gethostname()}"
        with pytest.raises(RunDirError, match=holder), second.lease():
            pass
    lease = Path(spec.run_dir) / LEASE
    assert not lease.exists(), "released when the holder ends"
    with second.lease():
        assert second.stage_record("reflect")["status"] == "running", "read again once held"


def test_a_lease_left_by_a_driver_that_died_is_taken_over(tmp_path):
    import json
    import socket
    import subprocess
    import sys

    from srd_ray.errors import RunDirError
    from srd_ray.run_dir import LEASE, LEASE_STALE_S, RunDirectory

    spec = minimal_spec(tmp_path)
    lease = Path(spec.run_dir) / LEASE
    lease.parent.mkdir(parents=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lease.write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout), "started": "then"}))
    with RunDirectory(spec).lease():  # its process is gone on this host
        assert json.loads(lease.read_text())["pid"] == os.getpid()
    lease.write_text(json.dumps({"host": "gpu-node-7", "pid": 1, "started": "then"}))
    with pytest.raises(RunDirError, match="pid 1 on gpu-node-7"), RunDirectory(spec).lease():
        pass  # another host's driver that still refreshes it
    old = time.time() - LEASE_STALE_S - 10
    os.utime(lease, (old, old))
    with RunDirectory(spec).lease():  # another host's, not refreshed for too long
        assert json.loads(lease.read_text())["host"] == socket.gethostname()


def test_a_lease_whose_pid_now_belongs_to_a_newer_process_is_taken_over(tmp_path):
    """After a restart a new process can get a dead driver's pid (in a container, even this driver's own):
    a pid that was born after the lease was taken, on a lease no longer refreshed, is not its holder."""
    import json
    import socket

    from srd_ray.errors import RunDirError
    from srd_ray.run_dir import LEASE, LEASE_STALE_S, RunDirectory

    spec = minimal_spec(tmp_path)
    lease = Path(spec.run_dir) / LEASE
    lease.parent.mkdir(parents=True)
    here = {"host": socket.gethostname(), "pid": os.getpid()}
    lease.write_text(json.dumps(here | {"started": "2026-01-01T00:00:00+00:00"}))  # before this process began
    with pytest.raises(RunDirError, match=f"pid {os.getpid()} on"), RunDirectory(spec).lease():
        pass  # refreshed lately: perhaps a live holder whose clock stepped forward
    old = time.time() - LEASE_STALE_S - 10
    os.utime(lease, (old, old))
    with RunDirectory(spec).lease():  # and no longer refreshed: the pid is a newer process's
        assert json.loads(lease.read_text())["started"] != "2026-01-01T00:00:00+00:00"
    lease.write_text(json.dumps(here | {"started": datetime.now(timezone.utc).isoformat(timespec="seconds")}))
    os.utime(lease, (old, old))
    with pytest.raises(RunDirError, match=f"pid {os.getpid()} on"), RunDirectory(spec).lease():
        pass  # the same pid, alive since before the lease: its holder, refreshed or not
