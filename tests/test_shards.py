"""Evaluation shared among processes: two processes (torchrun, gloo) sample the set one process samples,
and a killed evaluation made again makes only its missing batches."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import evaluate
import train
from unimodal import shards
from unimodal.config import load_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.depth=2", "model.hidden_size=64", "model.num_heads=1", "global_batch=4", "log_every=1",
        "eval_at_end=False", "optim.warmup_steps=0", "ema_decay=0.0", "precision=fp32", "steps=2", "ckpt_every=2"]


def trained(config: str, out: Path, *extra: str) -> Path:
    cfg = load_config(ROOT / f"configs/{config}.py", TINY + [f"out_dir={out}", *extra])
    train.train(cfg, quiet=True)
    return out


def test_sample_set_makes_only_the_batches_a_killed_run_left_missing(tmp_path):
    calls = []

    def make(first, count):  # a stand-in sampler: sample j is (j, j^2)
        calls.append(first)
        if first == 6 and len(calls) < 10:
            raise KeyboardInterrupt("killed")
        j = np.arange(first, first + count)
        return np.stack([j, j ** 2], 1)

    with pytest.raises(KeyboardInterrupt):
        shards.sample_set(make, 11, 3, tmp_path, "tag")
    assert calls == [0, 3, 6]
    calls += [None] * 7  # the next call at 6 succeeds
    out = shards.sample_set(make, 11, 3, tmp_path, "tag")
    assert calls[10:] == [6, 9]  # batches 0 and 3 were on disk
    j = np.arange(11)
    assert np.array_equal(out, np.stack([j, j ** 2], 1))
    # another batch size is another set of files: made anew, the same samples
    calls.clear()
    calls += [None] * 10
    assert np.array_equal(shards.sample_set(make, 11, 4, tmp_path, "tag"), out) and calls[10:] == [0, 4, 8]
    shards.done(tmp_path, "tag", 11, 3)
    shards.done(tmp_path, "tag", 11, 4)
    assert not (tmp_path / ".samples").exists()  # removed once the results are written
    with pytest.raises(ValueError, match="batch"):
        shards.sample_set(make, 11, 0, tmp_path, "tag")


def test_a_sample_set_another_evaluation_is_writing_is_refused(tmp_path):
    import fcntl
    first = shards.sample_set(lambda f, c: np.arange(f, f + c), 5, 2, tmp_path, "t")  # leaves its batches
    with open(tmp_path / ".samples" / "t-n5-b2.lock", "w") as held:  # another evaluation at work
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(RuntimeError, match="another evaluation is writing"):
            shards.sample_set(lambda f, c: np.arange(f, f + c), 5, 2, tmp_path, "t")
    assert np.array_equal(shards.sample_set(lambda f, c: None, 5, 2, tmp_path, "t"), first)  # all on disk


def _gather_worker(rank: int, init: str, n: int, out: str) -> None:
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    mine = shards.shard(n)
    rows = torch.arange(mine.start, mine.stop, dtype=torch.float64)[:, None] * torch.tensor([1.0, -1.0])  # (m, 2)
    got = shards.gather_rows(rows, n)
    torch.save(got, f"{out}.{rank}")
    dist.destroy_process_group()


def test_gathered_rows_come_back_in_order_from_uneven_shares(tmp_path):
    n = 7  # shares of 3 and 4 rows: the shorter one padded for the all-gather
    torch.multiprocessing.spawn(_gather_worker, args=(f"file://{tmp_path / 'pg'}", n, str(tmp_path / "rows")), nprocs=2)
    want = torch.arange(n, dtype=torch.float64)[:, None] * torch.tensor([1.0, -1.0])
    for rank in range(2):
        assert torch.equal(torch.load(tmp_path / f"rows.{rank}", weights_only=True), want)


def test_the_tag_follows_the_weights_and_the_settings():
    net = torch.nn.Linear(3, 2)
    a = shards.weights_tag(net, steps=25)
    assert a == shards.weights_tag(net, steps=25)
    assert a != shards.weights_tag(net, steps=50)
    with torch.no_grad():
        net.bias[0] += 1e-6
    assert a != shards.weights_tag(net, steps=25)


def test_a_killed_evaluation_resumes_to_the_set_of_an_uninterrupted_one(tmp_path, monkeypatch):
    run = trained("mnist_class_tiny", tmp_path / "run")
    flags = ["task.eval_samples=6", "task.eval_batch=2", "task.sample_steps=2"]
    whole = evaluate.evaluate_run(run, tmp_path / "whole", overrides=flags)
    import tasks.class_image as ci
    real = ci.ClassImageTask.generate
    made = []

    def killed_at_the_third(self, model, labels, seed=0, steps=None, cfg_scale=None, first=0):
        made.append((first, len(labels)))
        if first == 4 and made.count((4, 2)) == 1:
            raise KeyboardInterrupt("killed")
        return real(self, model, labels, seed=seed, steps=steps, cfg_scale=cfg_scale, first=first)
    monkeypatch.setattr(ci.ClassImageTask, "generate", killed_at_the_third)
    with pytest.raises(KeyboardInterrupt):
        evaluate.evaluate_run(run, tmp_path / "part", overrides=flags)
    again = evaluate.evaluate_run(run, tmp_path / "part", overrides=flags)
    assert [m for m in made if m[1] == 2] == [(0, 2), (2, 2), (4, 2), (4, 2)]  # the grid besides
    with np.load(tmp_path / "whole/samples.npz") as a, np.load(tmp_path / "part/samples.npz") as b:
        assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["labels"], b["labels"])
    assert again["class_accuracy"] == whole["class_accuracy"]


@pytest.mark.parametrize("config", ["mnist_class_tiny", "moving_mnist_video_tiny"])
def test_two_processes_evaluate_the_set_of_one(tmp_path, config):
    run = trained(config, tmp_path / "run")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    args = [str(run), "--samples", "5", "--batch", "2", "--steps", "2", "task.extend_frames=0"
            if config.startswith("moving") else "task.hflip=False"]
    one = subprocess.run([sys.executable, "evaluate.py", *args, "--out", str(tmp_path / "one")],
                         cwd=ROOT, env=env, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          "29523", "evaluate.py", *args, "--out", str(tmp_path / "two")],
                         cwd=ROOT, env=env, capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count('"samples": 5') == 1 and "{}" not in two.stdout  # process 0 prints the metrics
    with np.load(tmp_path / "one/samples.npz") as a, np.load(tmp_path / "two/samples.npz") as b:
        assert sorted(a.files) == sorted(b.files)
        for k in a.files:
            assert np.array_equal(a[k], b[k]), k
    m1, m2 = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("one", "two"))
    assert {k: v for k, v in m1.items() if k != "class_grid"} == {k: v for k, v in m2.items() if k != "class_grid"}


def _run(cmd: list[str], env: dict) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def test_two_processes_probe_and_classify_as_one(tmp_path):
    """The linear probe's features extracted in two shares and gathered train the head of one process;
    classification top-1 over the test set shared by two processes is that of one."""
    gen = trained("mnist_class_tiny", tmp_path / "gen")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    two = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29529"]
    probe = TINY[:3] + ["global_batch=8", "steps=4", "ckpt_every=4", "eval_at_end=True", "precision=fp32",
                        "task.train_limit=50", "task.test_limit=30", "task.eval_batch=16", f"init_from={gen}"]
    for n, launcher in (("one", [sys.executable]), ("two", two)):
        _run([*launcher, "train.py", "configs/mnist_probe_tiny.py", *probe, f"out_dir={tmp_path / n}", "--quiet"], env)
    m1, m2 = (json.loads((tmp_path / n / "eval/metrics.json").read_text()) for n in ("one", "two"))
    assert m1["examples"] == m2["examples"] == 30 and m1["top1"] == m2["top1"]
    # the head's BatchNorm normalises each process's half of a batch: close, not equal
    assert m1["test_loss"] == pytest.approx(m2["test_loss"], rel=1e-3)
    assert m1["train_top1"] == m2["train_top1"]
    ft = trained("mnist_finetune_tiny", tmp_path / "ft", "task.train_limit=16", "task.test_limit=30", f"init_from={gen}")
    for n, launcher in (("ev1", [sys.executable]), ("ev2", two)):
        _run([*launcher, "evaluate.py", str(ft), "--out", str(tmp_path / n), "task.eval_batch=8"], env)
    e1, e2 = (json.loads((tmp_path / n / "metrics.json").read_text()) for n in ("ev1", "ev2"))
    assert e1["examples"] == e2["examples"] == 30 and e1["top1"] == e2["top1"]
    assert e1["test_loss"] == pytest.approx(e2["test_loss"], rel=1e-4)
