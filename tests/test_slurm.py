"""slurm/train.sh and slurm/shard.sh on a real SLURM cluster: slurmctld + two slurmd "nodes" on this
host (tests/slurm_cluster.py installs and starts it, and always stops it). Needs root and apt-get.

1. A 2-node job (one launcher per node, one process each) trains to the end: checkpoints, TensorBoard
   events, summary.json with 2 processes, machine ranks 0 and 1 on node1 and node2.
2. Preemption: SIGUSR1 to the batch shell mid-training -> checkpoint -> requeue -> resume -> the same
   number of updates as the uninterrupted job of test 1, each update done exactly once, and
   bitwise the same final weights.
3. The sharding array job + merge writes the same manifest (shards, sha256, counts) as one process.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, clean_env
from safetensors.torch import load_file
from slurm_cluster import LocalSlurm, unavailable_reason

from modaseg.checkpoint import list_checkpoints
from modaseg.config import load_config
from modaseg.manifest import read_manifest

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.multiprocess]

EPOCHS = 3  # enough updates after the signal point that the signal always lands mid-training
JOB_TIMEOUT = 240


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    reason = unavailable_reason()
    if reason:
        pytest.skip(f"no local SLURM cluster: {reason}")
    c = LocalSlurm(tmp_path_factory.mktemp("slurm"), nodes=2, cpus=4)
    try:
        c.start()
        yield c
    finally:
        c.stop()


def job_env() -> dict[str, str]:
    """What sbatch exports to the job: this interpreter's venv, one thread per process, and nothing
    from an enclosing SLURM job (when the tests themselves run under SLURM)."""
    env = {k: v for k, v in clean_env().items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
    venv = Path(sys.prefix)
    env["MODASEG_VENV"] = str(venv) if (venv / "bin" / "activate").is_file() else ""
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def train_job(cluster: LocalSlurm, run_dir: Path, shards: Path, log_dir: Path) -> str:
    """`sbatch -N 2 slurm/train.sh configs/tiny.yaml ...` as a user of a CPU cluster would type it."""
    return cluster.sbatch(
        "--nodes=2",
        "--cpus-per-task=1",
        "--gpus-per-node=0",
        f"--output={log_dir}/slurm-%j.out",
        "slurm/train.sh",
        "configs/tiny.yaml",
        f"data.shards={shards}",
        f"train.output_dir={run_dir}",
        f"train.epochs={EPOCHS}",
        cwd=ROOT,
        env=job_env(),
    )


def logged_updates(text: str) -> list[int]:
    return [int(m) for m in re.findall(r" update (\d+) loss ", text)]


def expected_updates(shards: Path) -> int:
    """Independent of train.py: the train split over 2 ranks x the batch of configs/tiny.yaml, a partial
    last batch rounded up, one update per batch."""
    cfg = load_config(str(ROOT / "configs" / "tiny.yaml"), [])
    assert cfg.optim.grad_accum == 1 and not cfg.train.steps_per_epoch
    train = read_manifest(shards).splits["train"].num_samples
    return EPOCHS * math.ceil(train / (2 * cfg.data.batch_size))


def describe(cluster: LocalSlurm, log_dir: Path) -> str:
    outs = "\n".join(f"--- {p}\n{p.read_text()[-4000:]}" for p in sorted(log_dir.glob("*.out")))
    return f"{outs}\n{cluster.logs(15)}"


@pytest.fixture(scope="module")
def two_node_run(cluster, shard_dir, tmp_path_factory):
    """The uninterrupted 2-node job: (run dir, job record, batch output)."""
    tmp = tmp_path_factory.mktemp("slurm-train")
    run_dir = tmp / "run"
    job = train_job(cluster, run_dir, shard_dir, tmp)
    (record,) = cluster.wait(job, JOB_TIMEOUT)
    out = tmp / f"slurm-{job}.out"
    assert record["JobState"] == "COMPLETED" and record["ExitCode"] == "0:0", describe(cluster, tmp)
    return run_dir, record, out.read_text()


def test_two_node_job_trains_to_the_end(two_node_run, shard_dir):
    run_dir, record, out = two_node_run
    assert record["NumNodes"] == "2" and record["Restarts"] == "0"
    # One launcher per node, each with its own machine rank (not every node computing rank 0).
    assert "node node1: machine_rank 0 of 2" in out, out
    assert "node node2: machine_rank 1 of 2" in out, out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["epochs"] == EPOCHS
    assert summary["updates"] == expected_updates(shard_dir)
    assert logged_updates((run_dir / "train.log").read_text()) == list(range(1, summary["updates"] + 1))
    assert list_checkpoints(run_dir), "no checkpoint"
    assert (run_dir / "final" / "model.safetensors").is_file()

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    steps = [e.step for e in acc.Scalars("train/loss")]
    assert steps == list(range(1, summary["updates"] + 1))
    assert "training finished" in out


def test_preempted_job_checkpoints_requeues_and_resumes(cluster, two_node_run, shard_dir, tmp_path):
    run_dir = tmp_path / "run"
    job = train_job(cluster, run_dir, shard_dir, tmp_path)
    log = run_dir / "train.log"
    deadline = time.time() + JOB_TIMEOUT
    while not (log.is_file() and " update 2 loss " in log.read_text()):
        assert time.time() < deadline, "training never reached update 2\n" + describe(cluster, tmp_path)
        assert cluster.jobs(job)[0]["JobState"] in ("PENDING", "RUNNING"), describe(cluster, tmp_path)
        time.sleep(0.2)
    # What `#SBATCH --signal=B:USR1@300` does 5 minutes before the time limit: SIGUSR1 to the batch shell.
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True, env=cluster.env)
    (record,) = cluster.wait(job, JOB_TIMEOUT)
    out = (tmp_path / f"slurm-{job}.out").read_text()
    assert record["JobState"] == "COMPLETED" and record["ExitCode"] == "0:0", describe(cluster, tmp_path)
    assert record["Restarts"] == "1", out

    # First run: the signal reached the training processes, they saved together and exited 75.
    assert "got SIGUSR1" in out and "requeueing" in out, out
    text = log.read_text()
    assert "stop requested (signal 15)" in text and "exiting with code 75" in text, text[-3000:]
    resumed = re.search(r"resumed from (\S+) \(epoch \d+, batch \d+, (\d+) updates\)", text)
    assert resumed, text[-3000:]
    at = int(resumed.group(2))
    assert Path(resumed.group(1)).name == f"step-{at:08d}"

    # Second run (same job id, appended output): finished with the uninterrupted run's update count,
    # every update done exactly once: 1..at before the stop, at+1..total after the resume.
    assert "restart 1] training finished" in out, out
    summary = json.loads((run_dir / "summary.json").read_text())
    reference = json.loads((two_node_run[0] / "summary.json").read_text())
    total = reference["updates"]
    assert summary["updates"] == total and summary["processes"] == 2 and summary["epochs"] == EPOCHS
    assert 2 <= at < total, f"stopped at update {at} of {total}: not mid-training"
    before, after = text[: resumed.start()], text[resumed.end() :]
    assert logged_updates(before) == list(range(1, at + 1))
    assert logged_updates(after) == list(range(at + 1, total + 1))
    # And the very same model: resuming on two nodes is exact, like an uninterrupted run.
    final, expected = (load_file(str(d / "final" / "model.safetensors")) for d in (run_dir, two_node_run[0]))
    assert final.keys() == expected.keys()
    for key in expected:
        assert torch.equal(final[key], expected[key]), f"{key} differs after the requeue"


def test_shard_array_job_matches_a_single_process_run(cluster, synth_dataset, shard_dir, tmp_path):
    out = tmp_path / "shards"
    tasks = 3
    job = cluster.sbatch(
        f"--array=0-{tasks - 1}",
        "--cpus-per-task=1",
        f"--output={tmp_path}/shard-%A_%a.out",
        "slurm/shard.sh",
        "--annotations",
        str(synth_dataset / "annotations.json"),
        "--images",
        str(synth_dataset / "images"),
        "--out",
        str(out),
        "--shard-size",
        "6",
        cwd=ROOT,
        env=job_env(),
    )
    records = cluster.wait(job, JOB_TIMEOUT)
    assert len(records) == tasks, records
    assert all(r["JobState"] == "COMPLETED" for r in records), describe(cluster, tmp_path)
    first = (tmp_path / f"shard-{job}_0.out").read_text()
    merge = re.search(r"merge job (\d+) queued", first)
    assert merge, first
    (record,) = cluster.wait(merge.group(1), JOB_TIMEOUT)
    assert record["JobState"] == "COMPLETED", describe(cluster, tmp_path)
    for i in range(tasks):
        assert f"task {i} of {tasks}" in (tmp_path / f"shard-{job}_{i}.out").read_text()
    merge_out = (tmp_path / f"slurm-modaseg-shard-merge-{merge.group(1)}.out").read_text()
    assert "verify: every shard" in merge_out, merge_out

    got = json.loads((out / "manifest.json").read_text())
    want = json.loads((shard_dir / "manifest.json").read_text())
    assert got == want  # same shards, sha256, sizes, per-class statistics and counts
    assert sum(len(s["shards"]) for s in got["splits"].values()) > tasks  # every task had work
    assert (out / "rejects.jsonl").read_text() == (shard_dir / "rejects.jsonl").read_text()


def test_scripts_refuse_to_run_outside_slurm():
    env = {k: v for k, v in job_env().items() if k != "SLURM_JOB_ID"}
    for script in ("slurm/train.sh", "slurm/shard.sh"):
        r = subprocess.run(
            ["bash", script, "configs/tiny.yaml"], cwd=ROOT, env=env, capture_output=True, text=True
        )
        assert r.returncode == 2 and "submit with sbatch" in r.stderr, (script, r.stderr)


def test_default_cpus_cover_every_gpu_process_and_its_data_workers():
    """The script's #SBATCH defaults give each GPU's training process a core and each of its
    data-loader workers (configs/modanet.yaml's data.workers) one: fewer oversubscribe the node."""
    text = (ROOT / "slurm" / "train.sh").read_text()
    defaults = dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)$", text, re.MULTILINE))
    workers = load_config(str(ROOT / "configs" / "modanet.yaml"), []).data.workers
    assert isinstance(workers, int)
    assert int(defaults["cpus-per-task"]) >= int(defaults["gpus-per-node"]) * (workers + 1)
    readme = (ROOT / "slurm" / "README.md").read_text()
    assert f"`--cpus-per-task={defaults['cpus-per-task']}`" in readme
