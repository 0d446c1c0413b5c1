"""train.py: two processes equal one, resume equals an uninterrupted run, checkpoints survive
crashes, non-finite losses stop the run, pickled payloads are refused; evaluate.py end to end."""
import dataclasses
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import evaluate
import train
from unimodal import checkpoint as ckpt
from unimodal.config import load_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.depth=2", "model.hidden_size=64", "model.num_heads=1",
        "global_batch=4", "log_every=1", "eval_at_end=False", "optim.warmup_steps=2", "optim.lr=1e-3",
        "ema_decay=0.99", "precision=fp32"]


def tiny_cfg(out, *extra):
    return load_config(ROOT / "configs/mnist_class_tiny.py", TINY + [f"out_dir={out}", *extra])


def losses(run_dir):
    return [json.loads(l) for l in (Path(run_dir) / "log.jsonl").read_text().splitlines()]


def killed_at(step: int, monkeypatch, cfg) -> None:
    """Runs the image task's training until it is killed while fetching the batch of `step`."""
    import tasks.class_image as ci
    real_batch = ci.ClassImageTask.batch

    def killed(self, s):
        if s == step:
            raise KeyboardInterrupt("killed")
        return real_batch(self, s)
    monkeypatch.setattr(ci.ClassImageTask, "batch", killed)
    with pytest.raises(KeyboardInterrupt):
        train.train(cfg, quiet=True)
    monkeypatch.setattr(ci.ClassImageTask, "batch", real_batch)


def test_resume_reproduces_the_uninterrupted_trajectory(tmp_path, monkeypatch):
    full = train.train(tiny_cfg(tmp_path / "a", "steps=6", "ckpt_every=3"), quiet=True)["history"]

    killed_at(4, monkeypatch, tiny_cfg(tmp_path / "b", "steps=6", "ckpt_every=3"))
    assert ckpt.latest(tmp_path / "b").name == "step_0000003"
    resumed = train.train(tiny_cfg(tmp_path / "b", "steps=6", "ckpt_every=3"), resume=True, quiet=True)["history"]
    assert [r["step"] for r in resumed] == [4, 5, 6]
    for a, b in zip(full[3:], resumed):
        assert a["step"] == b["step"] and a["lr"] == pytest.approx(b["lr"], rel=1e-12)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-7)
    wa = load_file(str(tmp_path / "a/step_0000006/model.safetensors"))
    wb = load_file(str(tmp_path / "b/step_0000006/model.safetensors"))
    ea = load_file(str(tmp_path / "a/step_0000006/ema.safetensors"))
    eb = load_file(str(tmp_path / "b/step_0000006/ema.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(ea[k], eb[k], atol=1e-6, rtol=1e-5)


def test_a_crash_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    train.train(tiny_cfg(tmp_path, "steps=2", "ckpt_every=2"), quiet=True)
    before = ckpt.latest(tmp_path)
    weights = load_file(str(before / "model.safetensors"))

    def dies(*a, **k):
        raise OSError("power cut while writing state.pt")
    monkeypatch.setattr(ckpt.torch, "save", dies)
    with pytest.raises(OSError, match="power cut"):
        train.train(tiny_cfg(tmp_path, "steps=4", "ckpt_every=2"), resume=True, quiet=True)
    after = ckpt.latest(tmp_path)
    assert after == before  # `latest` still names the last complete checkpoint
    assert (tmp_path / "latest").read_text().strip() == before.name
    for k, v in load_file(str(after / "model.safetensors")).items():
        assert torch.equal(v, weights[k])
    assert ckpt.load_state(after)["step"] == 2


@pytest.mark.parametrize("what", ["loss", "gradient norm"])
def test_a_non_finite_loss_or_gradient_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch,
                                                                                        what):
    import tasks.class_image as ci
    real_loss = ci.ClassImageTask.loss
    calls = {"n": 0}

    def corrupt_at_3(self, model, batch):
        loss, parts = real_loss(self, model, batch)
        calls["n"] += 1
        if calls["n"] == 3:  # the loss nan, or + sqrt(0 p): the value stays, the gradient is 0 * inf = nan
            loss = loss * float("nan") if what == "loss" else loss + (next(model.parameters())[:1] * 0).sum().sqrt()
        return loss, parts
    monkeypatch.setattr(ci.ClassImageTask, "loss", corrupt_at_3)
    with pytest.raises(train.NonFiniteLoss, match=f"non-finite {what} .*at step 2"):
        train.train(tiny_cfg(tmp_path, "steps=6", "ckpt_every=2"), quiet=True)
    good = ckpt.latest(tmp_path)
    assert good.name == "step_0000002"
    assert all(torch.isfinite(v).all() for v in load_file(str(good / "model.safetensors")).values())


def test_a_new_run_refuses_an_out_dir_with_another_runs_checkpoints(tmp_path):
    train.train(tiny_cfg(tmp_path, "steps=4", "ckpt_every=2", "keep_checkpoints=1"), quiet=True)
    assert [p.name for p in tmp_path.glob("step_*")] == ["step_0000004"]
    with pytest.raises(train.OutDirInUse, match="holds the checkpoints of another run .*--resume.*--overwrite"):
        train.train(tiny_cfg(tmp_path, "steps=2", "ckpt_every=1"), quiet=True)
    assert ckpt.load_state(ckpt.latest(tmp_path))["step"] == 4  # untouched
    train.train(tiny_cfg(tmp_path, "steps=2", "ckpt_every=1", "keep_checkpoints=1"), quiet=True, overwrite=True)
    assert [p.name for p in tmp_path.glob("step_*")] == ["step_0000002"]  # the old run's step 4 is gone
    assert len(losses(tmp_path)) == 2  # and so is its log
    res = subprocess.run([sys.executable, str(ROOT / "train.py"), str(ROOT / "configs/mnist_class_tiny.py"),
                          *TINY, f"out_dir={tmp_path}", "steps=1"], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 2 and "--overwrite" in res.stderr and "Traceback" not in res.stderr


def test_resuming_with_another_parameter_grouping_says_what_to_do(tmp_path):
    train.train(tiny_cfg(tmp_path, "steps=2", "ckpt_every=2"), quiet=True)
    with pytest.raises(ckpt.CheckpointError, match=r"2 parameter groups, this run builds \d+ .*init_from="):
        train.train(tiny_cfg(tmp_path, "steps=4", "ckpt_every=2", "optim.layer_decay=0.75"), resume=True, quiet=True)


def test_pruning_keeps_the_checkpoint_just_written(tmp_path):
    sd = {"w": torch.zeros(2)}
    for step in (500, 1000):
        ckpt.save(tmp_path, step, sd, {"step": step}, {}, keep=2)
    (tmp_path / ".tmp_step_0000007_999999999").mkdir()  # a crashed save of a process that is gone
    written = ckpt.save(tmp_path, 100, sd, {"step": 100}, {}, keep=2)
    assert written.is_dir() and ckpt.latest(tmp_path) == written
    assert not (tmp_path / ".tmp_step_0000007_999999999").exists()


def test_ema_without_warmup_keeps_its_decay_from_the_first_step(tmp_path):
    """ema_warmup=False (DiT): the EMA starts as a copy of the weights and then moves by a constant decay."""
    train.train(tiny_cfg(tmp_path, "steps=2", "ckpt_every=1", "keep_checkpoints=2", "ema_decay=0.5",
                         "ema_warmup=false"), quiet=True)
    w1, e1 = (load_file(str(tmp_path / "step_0000001" / f)) for f in ("model.safetensors", "ema.safetensors"))
    w2, e2 = (load_file(str(tmp_path / "step_0000002" / f)) for f in ("model.safetensors", "ema.safetensors"))
    moved = [k for k in w1 if not torch.equal(w1[k], w2[k])]
    assert moved
    for k in w1:
        assert torch.equal(e1[k], w1[k])
        torch.testing.assert_close(e2[k], 0.5 * e1[k] + 0.5 * w2[k])


def test_weight_decay_applies_to_matrices_only():
    from unimodal.model import ACDiT
    cfg = load_config(ROOT / "configs/mnist_finetune_tiny.py")
    for layer_decay in (1.0, 0.75):
        c = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, layer_decay=layer_decay))
        model = ACDiT(c.model)
        names = {id(p): n for n, p in model.named_parameters()}
        groups = train.param_groups(model, c)
        assert sum(len(g["params"]) for g in groups) == len(names)
        for g in groups:
            for p in g["params"]:
                n = names[id(p)]
                table = n.startswith(("y_embedder.", "tok_embedder."))
                assert g["weight_decay"] == (c.optim.weight_decay if p.ndim == 2 and not table else 0.0), n
        assert {g["weight_decay"] for g in groups} == {0.0, c.optim.weight_decay}


class Payload:
    def __reduce__(self):
        return (os.system, ("touch /tmp/unimodal_pwned",))


def test_a_checkpoint_with_a_pickled_payload_is_refused(tmp_path):
    train.train(tiny_cfg(tmp_path, "steps=1", "ckpt_every=1"), quiet=True)
    c = ckpt.latest(tmp_path)
    state = ckpt.load_state(c)
    state["evil"] = Payload()
    torch.save(state, c / "state.pt")
    if os.path.exists("/tmp/unimodal_pwned"):
        os.remove("/tmp/unimodal_pwned")
    with pytest.raises(ckpt.CheckpointError, match="cannot be read safely.*posix.system") as e:  # names what it refused
        ckpt.load_state(c)
    assert "trust the source" not in str(e.value) and "\x1b" not in str(e.value)
    with pytest.raises(ckpt.CheckpointError):
        train.train(tiny_cfg(tmp_path, "steps=2", "ckpt_every=1"), resume=True, quiet=True)
    assert not os.path.exists("/tmp/unimodal_pwned")


def test_unknown_override_fails_with_the_valid_keys():
    with pytest.raises(KeyError, match="unknown key 'detph'.*valid keys"):
        load_config(ROOT / "configs/mnist_class_tiny.py", ["model.detph=3"])


@pytest.mark.parametrize("config,override,match", [
    ("mnist_class_tiny", "model.num_heads=0", "num_heads must be at least 1"),
    ("mnist_class_tiny", "ema_decay=2", "ema_decay must be in"),
    ("mnist_class_tiny", "time_limit_min=-1", "time_limit_min must be 0 or more"),
    ("mnist_class_tiny", "precision=fp16", "precision must be one of"),
    ("mnist_class_tiny", "task.eval_samples=0", "task.eval_samples must be at least 1"),
    ("moving_mnist_video_tiny", "task.temporal_crop=middle", "task.temporal_crop must be one of"),
    ("mnist_finetune_tiny", "task.pool=max", "task.pool must be one of"),
    ("kjv_text_tiny", "task.seq_len=0", "task.seq_len must be at least 1"),
])
def test_a_bad_value_fails_when_the_config_is_made_naming_it(config, override, match):
    with pytest.raises(ValueError, match=match):
        load_config(ROOT / f"configs/{config}.py", [override])


def test_the_command_line_reports_bad_input_in_one_line(tmp_path):
    for args in (["configs/nope.py"], ["configs/mnist_class_tiny.py", "steps=abc"],
                 ["configs/mnist_class_tiny.py", "--quiet", "no.such=1"]):  # flags among the overrides
        res = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True)
        assert res.returncode == 2 and res.stderr.startswith("error: ") and "Traceback" not in res.stderr, res.stderr


def test_init_from_a_checkpoint_of_another_shape_is_refused(tmp_path):
    train.train(tiny_cfg(tmp_path / "a", "steps=1", "ckpt_every=1"), quiet=True)
    with pytest.raises(ckpt.CheckpointError, match="does not fit the model"):
        train.train(tiny_cfg(tmp_path / "b", "steps=1", "model.depth=3", f"init_from={tmp_path / 'a'}"), quiet=True)


def test_overrides_take_each_field_as_its_type():
    cfg = load_config(ROOT / "configs/mnist_class_tiny.py", ["out_dir=2024", "eval_at_end=false", "optim.lr=1e-3",
                                                             "optim.betas=(0.9, 0.95)", "task.scheduler='ddim'"])
    assert (cfg.out_dir, cfg.eval_at_end, cfg.optim.lr, cfg.optim.betas, cfg.task.scheduler) == \
        ("2024", False, 1e-3, (0.9, 0.95), "ddim")
    for bad, err, match in ((["steps=True"], TypeError, "'steps': expected int, got the boolean"),
                            (["eval_at_end=maybe"], TypeError, "'eval_at_end': expected bool"),
                            (["optim.betas=(0.9,)"], ValueError, "betas must be two numbers"),
                            (["optim.decay_type=cosin"], ValueError, "decay_type must be one of"),
                            (["optim.layer_decay=0"], ValueError, r"layer_decay must be in \(0, 1\]")):
        with pytest.raises(err, match=match):
            load_config(ROOT / "configs/mnist_class_tiny.py", bad)


def test_auto_precision_is_bf16_only_where_bf16_matmuls_are_fast(tmp_path):
    """"auto" against a measurement: bf16 where a bf16 product is not several times slower than the
    fp32 one (native bf16), fp32 where it is (PyTorch's reference loop); the run records what ran."""
    import time
    a = torch.randn(384, 384)
    rates = {}
    for dtype in (torch.float32, torch.bfloat16):
        x = a.to(dtype)
        x @ x
        t0 = time.perf_counter()
        for _ in range(3):
            x @ x
        rates[dtype] = time.perf_counter() - t0
    want = "bf16" if rates[torch.bfloat16] < 3 * rates[torch.float32] else "fp32"
    with pytest.raises(ValueError, match="precision must be one of"):
        train.train(tiny_cfg(tmp_path / "bad", "steps=1", "precision=fp16"), quiet=True)
    train.train(tiny_cfg(tmp_path / "run", "steps=1", "precision=auto"), quiet=True)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["precision"] == want


@pytest.mark.parametrize("config", ["mnist_class_tiny", "kjv_text_tiny"])
def test_two_processes_give_the_weights_of_one(tmp_path, config):
    """torchrun with 2 CPU processes (gloo) and the same global batch ends with the same weights; also for
    text-only training, whose passes leave the noise head and the conditioning path unused."""
    args = TINY + ["steps=3", "ckpt_every=3", "global_batch=4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    one = subprocess.run([sys.executable, "train.py", f"configs/{config}.py", *args,
                          f"out_dir={tmp_path / 'one'}", "--quiet"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", "29517", "train.py", f"configs/{config}.py", *args,
                          f"out_dir={tmp_path / 'two'}", "--quiet"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-3000:]
    assert ckpt.load_state(tmp_path / "two")["world_size"] == 2
    w1 = load_file(str(tmp_path / "one/step_0000003/model.safetensors"))
    w2 = load_file(str(tmp_path / "two/step_0000003/model.safetensors"))
    w0 = train_init_weights(config)
    moved = max(float((w1[k] - w0[k]).abs().max()) for k in w1 if k in w0)
    assert moved > 1e-4  # training changed the weights
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], atol=1e-5, rtol=1e-5)


def train_init_weights(config="mnist_class_tiny"):
    from tasks import build_task
    cfg = load_config(ROOT / f"configs/{config}.py", TINY + ["out_dir=/tmp/unused"])
    torch.manual_seed(cfg.seed)
    return build_task(cfg).build_model().state_dict()


def test_evaluate_writes_grid_npz_and_metrics(tmp_path):
    train.train(tiny_cfg(tmp_path, "steps=2", "ckpt_every=2"), quiet=True)
    m = evaluate.evaluate_run(tmp_path, tmp_path / "ev", overrides=["task.eval_samples=10", "task.eval_batch=10",
                                                                   "task.sample_steps=2"])
    assert (tmp_path / "ev/class_grid.png").is_file()
    import numpy as np
    z = np.load(tmp_path / "ev/samples.npz")
    assert z["arr_0"].shape == (10, 28, 28, 1) and z["arr_0"].dtype == np.uint8
    assert 0.0 <= m["class_accuracy"] <= 1.0 and m["weights"] == "ema"
    assert json.loads((tmp_path / "ev/metrics.json").read_text())["samples"] == 10
    # the command line's sampling flags reach the task's settings
    evaluate.main([str(tmp_path), "--samples", "20", "--batch", "20", "--steps", "2", "--cfg", "3.0",
                   "--out", str(tmp_path / "ev2"), "task.hflip=False"])
    assert json.loads((tmp_path / "ev2/metrics.json").read_text())["samples"] == 20
    with pytest.raises(SystemExit) as e:  # a key the task does not have fails, naming it
        evaluate.main([str(tmp_path), "task.no_such_key=1", "--out", str(tmp_path / "ev3")])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:  # a converted checkpoint's flag on a run is refused, not ignored
        evaluate.main([str(tmp_path), "--reference", "VIRTUAL_imagenet256_labeled.npz"])
    assert e.value.code == 2
    # by default beside the run's checkpoints, out of pruning's reach
    evaluate.evaluate_run(tmp_path, overrides=["task.eval_samples=4", "task.eval_batch=4", "task.sample_steps=1"])
    assert (tmp_path / "evaluations" / "step_0000002" / "eval_ema" / "metrics.json").is_file()


@pytest.mark.slow
def test_bf16_training_loss_stays_within_2_percent_of_fp32(tmp_path):
    """200 steps of the demo config (its own shape) in bf16 autocast and in fp32, same seed and
    data: the mean training loss, over all steps and over the last 50, agrees within 2%."""
    runs = {}
    for prec in ("bf16", "fp32"):
        cfg = load_config(ROOT / "configs/mnist_class_tiny.py", [
            "steps=200", "time_limit_min=0", "eval_at_end=False", "ckpt_every=1000", "log_every=1",
            f"precision={prec}", f"out_dir={tmp_path / prec}"])
        train.train(cfg, quiet=True)
        runs[prec] = [r["loss"] for r in losses(tmp_path / prec)]
    import numpy as np
    for sl in (slice(0, 200), slice(150, 200)):
        a, b = np.mean(runs["bf16"][sl]), np.mean(runs["fp32"][sl])
        print(f"steps {sl.start}-{sl.stop}: bf16 {a:.5f} fp32 {b:.5f} ({(a - b) / b * 100:+.2f}%)")
        assert abs(a - b) / b <= 0.02, (sl, a, b)


def test_time_budget_refit_continues_the_stretched_schedule_without_warnings(tmp_path):
    """The schedule refitted to a new total at step 37 (on the optimizer as accelerate wraps it, as
    train.py does) gives, from there on, the learning rates of transformers' WSD schedule built for
    that total from the start (the oracle), and no warning."""
    import warnings
    import dataclasses
    from accelerate import Accelerator
    from transformers import get_wsd_schedule

    cfg = tiny_cfg(tmp_path, "steps=100", "optim.warmup_steps=10", "optim.decay_frac=0.3")

    def fresh(total):  # as train.py: the schedule on the plain optimizer, which accelerate then wraps
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.optim.lr)
        sched = get_wsd_schedule(opt, num_warmup_steps=10, num_decay_steps=int(0.3 * total),
                                 num_training_steps=total, decay_type=cfg.optim.decay_type)
        return Accelerator(cpu=True).prepare(opt), sched

    opt, sched = fresh(100)
    ref_opt, ref = fresh(60)
    for _ in range(37):
        opt.step(), sched.step(), ref_opt.step(), ref.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sched = train._refit_schedule(opt, sched, dataclasses.replace(cfg, steps=60))
        lrs, ref_lrs = [], []
        for _ in range(23):
            lrs.append(opt.param_groups[0]["lr"])
            ref_lrs.append(ref_opt.param_groups[0]["lr"])
            opt.step(), sched.step(), ref_opt.step(), ref.step()
    assert lrs == pytest.approx(ref_lrs, rel=1e-12) and ref_lrs[-1] < ref_lrs[0]


def test_a_resumed_run_keeps_the_total_its_time_budget_refitted(tmp_path, monkeypatch):
    """A run refitted from 100 to 30 steps, killed at step 24 and resumed with the same command line,
    continues the stretched schedule: the learning rates and losses of the uninterrupted run."""
    monkeypatch.setattr(train, "_steps_in_budget", lambda done, left, per_step: 30)
    args = ("steps=100", "time_limit_min=60", "ckpt_every=10", "optim.decay_frac=0.5")
    full = train.train(tiny_cfg(tmp_path / "a", *args), quiet=True)["history"]
    assert len(full) == 30 and full[-1]["lr"] < full[20]["lr"]

    killed_at(24, monkeypatch, tiny_cfg(tmp_path / "b", *args))
    assert ckpt.latest(tmp_path / "b").name == "step_0000020"
    resumed = train.train(tiny_cfg(tmp_path / "b", *args), resume=True, quiet=True)["history"]
    assert [r["step"] for r in resumed] == list(range(21, 31))
    for a, b in zip(full[20:], resumed):
        assert a["lr"] == pytest.approx(b["lr"], rel=1e-12)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-7)
    # another `steps` on the command line sets a new total
    more = train.train(tiny_cfg(tmp_path / "b", "steps=34", "time_limit_min=0", "ckpt_every=10",
                                "optim.decay_frac=0.5"), resume=True, quiet=True)["history"]
    assert [r["step"] for r in more] == list(range(31, 35))


def test_ckpt_every_zero_saves_at_the_end_only_and_bad_intervals_fail(tmp_path):
    train.train(tiny_cfg(tmp_path, "steps=3", "ckpt_every=0"), quiet=True)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_0000003"]
    for bad in ("log_every=0", "ckpt_every=-1", "steps=0"):
        with pytest.raises(ValueError, match=bad.split("=")[0]):
            tiny_cfg(tmp_path / "bad", bad)
