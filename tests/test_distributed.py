"""Several processes (``accelerate launch`` / torchrun, gloo on the CPU) shard Stage I and agree
with one process."""

import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml

import emcid
from emcid import EditPatch

OPTIONS = {"steps": 3, "stats_samples": 50, "lam": 1.0, "layers": {"text_encoder": [1, 2]}}
PAIRS = [("lobster", "crab"), ("owl", "heron"), ("otter", "beaver"), ("fox", "dog")]


def test_two_cpu_processes_match_one(sd1, sd1_dir, tmp_path):
    requests = tmp_path / "requests.yaml"
    requests.write_text(yaml.safe_dump([{"source": s, "destination": d} for s, d in PAIRS]))
    out = tmp_path / "sharded.safetensors"
    cache = tmp_path / "cache"
    src = str(Path(emcid.__file__).resolve().parents[1])
    env = {**os.environ, "EMCID_CACHE": str(cache), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    # torchrun is what `accelerate launch --multi_gpu` runs; accelerate's --cpu runs one process.
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "emcid.cli", "edit", "--model", str(sd1_dir), "--requests", str(requests),
               "--out", str(out), "--steps", "3", "--stats-samples", "50", "--lam", "1.0",
               "--layers", "1-2"]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    bars = [line for line in run.stderr.replace("\r", "\n").splitlines()
            if line.startswith("Stage I:") and "100%" in line]
    # each process optimised its half (2 of 4, 3 steps each), then read the other half from
    # the cache
    assert any("concepts=2/2" in line for line in bars)
    assert not any("concepts=4/4" in line for line in bars)
    assert len(list((cache / "stage1").glob("*.safetensors"))) == len(PAIRS)
    sharded = EditPatch.load(out)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each process ran: the same reductions, so float-equal results
    try:
        alone = emcid.edit(sd1, [emcid.EditRequest(s, d) for s, d in PAIRS], progress=False, cache=False,
                           **OPTIONS)
    finally:
        torch.set_num_threads(threads)
    assert set(sharded.deltas) == set(alone.deltas)
    for name, delta in alone.deltas.items():
        dense = delta.dense() if hasattr(delta, "dense") else delta
        other = sharded.deltas[name]
        other = other.dense() if hasattr(other, "dense") else other
        assert torch.allclose(dense, other, atol=1e-5 * float(dense.abs().max()) + 1e-7), name
