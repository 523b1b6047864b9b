"""The training loop and the align/instruct stages, through the real `medvlm train` entry point."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.serve_fixtures import free_port
from tests.train_fixtures import pretrain_llm_on_captions, write_config, write_conversations, write_pairs
from train import state as saved
from train.loop import TrainConfig, lr_factor
from vlm.cli import main
from vlm.model import MedVLM

PROJECT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("train-data")
    return {"align": write_pairs(folder), "instruct": write_conversations(folder)}


def _losses(run: Path) -> list[float]:
    with (run / "metrics.csv").open() as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


def _train(stage, config, data_file, out, *extra) -> int:
    return main(["train", stage, "--config", str(config), "--train-data", str(data_file), "--out", str(out), *extra])


@pytest.mark.parametrize("stage", ["align", "instruct"])
def test_stage_runs_three_steps_through_the_cli(stage, data, tiny_llm_dir, tmp_path):
    config = write_config(tmp_path, tiny_llm_dir, steps=3)
    # both LLM stages measure their records, so both can batch by length
    assert _train(stage, config, data[stage], tmp_path / "run", "--group-by-length") == 0
    run = tmp_path / "run"
    assert len(_losses(run)) == 3
    assert (run / "loss.png").stat().st_size > 1000
    model = MedVLM.from_pretrained(str(run / "final"))
    assert model.config.language.lora_r == (4 if stage == "instruct" else 0)
    with (run / "metrics.csv").open() as f:
        header = next(csv.reader(f))
    assert {"loss", "lr", "grad_norm", "samples_per_s", "tokens_per_s"} <= set(header)


def test_align_trains_only_the_projector(data, tiny_llm_dir, tmp_path):
    config = write_config(tmp_path, tiny_llm_dir, steps=2)
    from train.cli import build_stage, load_config_file

    stage, _ = build_stage("align", load_config_file(str(config)), {}, {"train_data": str(data["align"])})
    model = stage.build_model()
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"projector"}


def test_instruct_trains_the_tower_at_its_fraction_of_the_lr(data, tiny_llm_dir, tmp_path, capsys):
    from train.cli import build_stage, load_config_file

    config = write_config(tmp_path, tiny_llm_dir, steps=2)
    stage, _ = build_stage("instruct", load_config_file(str(config)), {},
                           {"train_data": str(data["instruct"]), "vision_lr_scale": 0.25}, {"vision": {"trainable": True}})
    model = stage.build_model()
    groups = stage.param_groups(model)
    vision = {id(p) for p in model.vision.parameters()}
    assert [g["lr_scale"] for g in groups] == [1.0, 0.25]
    assert {id(p) for p in groups[1]["params"]} == vision and not vision & {id(p) for p in groups[0]["params"]}
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in model.parameters())
    assert _train("instruct", config, data["instruct"], tmp_path / "run", "--model.vision.trainable",
                  "--vision-lr-scale", "0.25") == 0
    assert (tmp_path / "run" / "final" / "vision.safetensors").is_file()
    assert _train("instruct", config, data["instruct"], tmp_path / "bad", "--model.vision.trainable",
                  "--vision-lr-scale", "0") == 2
    assert "vision_lr_scale must be in (0, 1]" in capsys.readouterr().err


def test_records_are_tokenized_once_for_the_context_check_and_length_grouping(data, tiny_llm_dir, tmp_path):
    from train.cli import build_stage, load_config_file
    from train.loop import _lengths

    config = write_config(tmp_path, tiny_llm_dir, steps=2)
    stage, train_cfg = build_stage("instruct", load_config_file(str(config)), {"group_by_length": True},
                           {"train_data": str(data["instruct"])})
    model = stage.build_model()
    train_set, _ = stage.datasets()
    expected = [len(model.processor.encode(list(r.messages)).input_ids) for r in train_set]

    def fail(*args, **kwargs):
        raise AssertionError("a record was tokenized again after loading")

    model.processor.encode = fail
    assert _lengths(stage, train_set, train_cfg) == expected


@pytest.fixture(scope="module")
def captioned_llm_dir(tiny_llm_dir, tmp_path_factory):
    return pretrain_llm_on_captions(tiny_llm_dir, tmp_path_factory.mktemp("captioned-llm"))


@pytest.mark.parametrize("stage", ["align", "instruct"])
def test_loss_falls_on_eight_memorizable_samples(stage, data, captioned_llm_dir, tmp_path):
    # The LLM already knows the 8 captions as text; which caption goes with which image it can
    # only learn through the trained parts (projector only, for align), so the loss falls
    # below what text alone allows.
    config = write_config(tmp_path, captioned_llm_dir, steps=30, lr=1e-2, batch_size=8)
    assert _train(stage, config, data[stage], tmp_path / "run") == 0
    losses = _losses(tmp_path / "run")
    first, last = losses[0], sum(losses[-3:]) / 3
    print(f"{stage}: loss {first:.3f} -> {last:.3f}")
    assert last < 0.8 * first, f"loss did not fall enough: {first:.3f} -> {last:.3f}"


def test_resume_is_exact(data, tiny_llm_dir, tmp_path):
    """6 straight steps == 3 steps, stop, resume, 3 more (identical weights on CPU)."""
    config = write_config(tmp_path, tiny_llm_dir, steps=6, lr=1e-2, save_every=3)
    assert _train("instruct", config, data["instruct"], tmp_path / "straight") == 0
    stopped = _child(tmp_path / "resumed", config, data["instruct"], stop_after=3)
    assert stopped.wait(timeout=300) == 0
    checkpoint = saved.latest(tmp_path / "resumed")
    assert checkpoint is not None and checkpoint.name == "step-00000003"
    assert not (tmp_path / "resumed" / "final").exists()
    assert _train("instruct", config, data["instruct"], tmp_path / "resumed") == 0
    a, b = _final_weights(tmp_path / "straight"), _final_weights(tmp_path / "resumed")
    assert a.keys() == b.keys() and len(a) > 2
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert _losses(tmp_path / "straight") == _losses(tmp_path / "resumed")


def _final_weights(run: Path) -> dict:
    weights = load_file(str(run / "final" / "projector.safetensors"))
    weights.update({f"adapter.{k}": v for k, v in load_file(str(run / "final" / "adapter" / "adapter_model.safetensors")).items()})
    return weights


CHILD = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {project!r})
    from train.cli import build_stage, load_config_file
    from train import loop, state
    stage, cfg = build_stage("instruct", load_config_file({config!r}), {{"out": {out!r}}}, {{"train_data": {data!r}}})
    stop_after, slow_from = {stop_after}, {slow_from}
    real_write, real_save = state.write, stage.save
    def write(out, step, *args):
        folder = real_write(out, step, *args)
        if stop_after and step >= stop_after:
            sys.exit(0)  # a clean stop right after a complete checkpoint
        return folder
    calls = []
    def save(model, folder):
        calls.append(folder)
        real_save(model, folder)
        if slow_from and len(calls) >= slow_from:
            print("WRITING", flush=True)
            time.sleep(60)  # mid-write: the test kills the process here
    state.write, stage.save = write, save
    loop.train(stage, cfg)
""")


def _child(out: Path, config: Path, data_file: Path, stop_after: int = 0, slow_from: int = 0) -> subprocess.Popen:
    code = CHILD.format(project=str(PROJECT), config=str(config), out=str(out), data=str(data_file),
                        stop_after=stop_after, slow_from=slow_from)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)


def _run_until(out: Path, config: Path, data_file: Path, stop_after: int) -> None:
    proc = _child(out, config, data_file, stop_after=stop_after)
    assert proc.wait(timeout=300) == 0


def test_sigkill_while_writing_a_checkpoint_keeps_the_previous_one(data, tiny_llm_dir, tmp_path):
    config = write_config(tmp_path, tiny_llm_dir, steps=10, save_every=1, keep_last=2)
    out = tmp_path / "run"
    proc = _child(out, config, data["instruct"], slow_from=2)
    line = proc.stdout.readline()  # blocks until the second checkpoint's model files are written
    assert "WRITING" in line
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    leftovers = list((out / "checkpoints").glob(".tmp-*"))
    assert leftovers, "the kill should have interrupted a write in progress"
    latest = saved.latest(out)
    assert latest is not None and latest.name == "step-00000001"
    trainer = json.loads((latest / "trainer.json").read_text())
    assert trainer["step"] == 1
    MedVLM.from_pretrained(str(latest / "model"))  # loadable
    # and a rerun resumes from it, cleaning the half-written folder
    assert _train("instruct", config, data["instruct"], out, "--steps", "3") == 0
    assert not list((out / "checkpoints").glob(".tmp-*"))
    assert len(_losses(out)) == 3


def test_a_second_run_into_a_busy_folder_is_refused_and_a_stale_lock_taken_over(data, tiny_llm_dir, tmp_path, capsys):
    from vlm.errors import ConfigError

    out = tmp_path / "run"
    with saved.run_lock(out):
        assert (out / saved.LOCK).read_text() == str(os.getpid())
        with pytest.raises(ConfigError, match="another training run"), saved.run_lock(out):
            pass
        # Through the command line: one clear line, and nothing written into the busy folder.
        config = write_config(tmp_path, tiny_llm_dir, steps=1)
        assert _train("align", config, data["align"], out) != 0
        assert "another training run" in capsys.readouterr().err
        assert not (out / "metrics.csv").exists()
    with saved.run_lock(out):  # released at the end of the run
        pass
    # A file naming a live process that does not hold the lock (a pid reused after a reboot) is stale.
    (out / saved.LOCK).write_text(str(os.getppid()))
    with saved.run_lock(out):
        assert (out / saved.LOCK).read_text() == str(os.getpid())
    # A run killed while it holds the lock (SIGKILL: no clean-up runs) leaves it free for the next.
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from train.state import run_lock\n"
                               "with run_lock(Path(sys.argv[1])):\n print('locked', flush=True); time.sleep(600)",
                               str(out)], stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1])
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ConfigError, match=f"pid {holder.pid}"), saved.run_lock(out):
            pass
    finally:
        holder.kill()
        holder.wait()
    with saved.run_lock(out):
        assert (out / saved.LOCK).read_text() == str(os.getpid())


def test_lr_schedule_warms_up_then_decays():
    cfg = TrainConfig(steps=10, warmup_steps=2, min_lr_ratio=0.1)
    factors = [lr_factor(s, cfg) for s in range(10)]
    assert factors[0] == pytest.approx(0.5) and factors[1] == pytest.approx(1.0)
    assert factors[2] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[2:], factors[3:]))
    assert factors[-1] > 0.1 and lr_factor(10, cfg) == pytest.approx(0.1)


def _bad_data(folder: Path) -> dict[str, Path]:
    from tests.train_fixtures import make_images

    images = make_images(folder / "images", 2)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    good = {"id": "ok", "image": str(images[0]), "conversations": [
        {"from": "human", "value": "<image>\nWhat is shown?"}, {"from": "gpt", "value": "a chest x-ray."}]}
    records = [
        good,
        {**good, "id": "missing", "image": "images/nope.png"},
        {**good, "id": "unreadable", "image": "broken.png"},
        {**good, "id": "no-assistant", "conversations": [{"from": "human", "value": "<image>\nHello?"}]},
        {**good, "id": "too-long", "conversations": [
            {"from": "human", "value": "<image>\n" + "please describe " * 200}, {"from": "gpt", "value": "ok"}]},
    ]
    path = folder / "bad.json"
    path.write_text(json.dumps(records, indent=1))
    return {"conversations": path}


def test_bad_records_are_reported_with_file_and_line(tiny_llm_dir, tmp_path, capsys):
    bad = _bad_data(tmp_path)["conversations"]
    config = write_config(tmp_path, tiny_llm_dir, steps=1, batch_size=1)
    assert _train("instruct", config, bad, tmp_path / "run") == 2
    err = capsys.readouterr().err
    assert "4 invalid record(s)" in err and "--skip-bad" in err

    def line_of(record_id):  # the line where that record's object starts: the "{" above its id
        text = bad.read_text().splitlines()
        return next(i for i, line in enumerate(text, 1) if f'"id": "{record_id}"' in line) - 1

    assert f"bad.json:{line_of('missing')}: image" in err and "does not exist" in err
    assert f"bad.json:{line_of('unreadable')}: image" in err and "unreadable" in err
    assert f"bad.json:{line_of('no-assistant')}: the conversation has no assistant" in err
    assert f"bad.json:{line_of('too-long')}: sample is" in err and "longer than the context (256)" in err
    assert not (tmp_path / "run" / "metrics.csv").exists(), "training must not start"
    # With --skip-bad the good record trains and the bad ones are dropped and counted.
    assert _train("instruct", config, bad, tmp_path / "run", "--skip-bad") == 0
    assert len(_losses(tmp_path / "run")) == 1


def test_bad_pairs_are_reported(tiny_llm_dir, tmp_path, capsys):
    from tests.train_fixtures import make_images

    images = make_images(tmp_path / "images", 2)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join([
        json.dumps({"image": str(images[0]), "text": "a chest x-ray."}),
        json.dumps({"image": "images/missing.png", "text": "x"}),
        "{not json",
        json.dumps({"image": str(images[1]), "text": ""}),
    ]) + "\n")
    config = write_config(tmp_path, tiny_llm_dir, steps=1, batch_size=1)
    assert _train("align", config, pairs, tmp_path / "run") == 2
    err = capsys.readouterr().err
    assert "pairs.jsonl:2: image" in err and "pairs.jsonl:3: not valid JSON" in err
    assert "pairs.jsonl:4: 'text' is missing or empty" in err


def test_progress_reports_rates(data, tiny_llm_dir, tmp_path, capsys):
    config = write_config(tmp_path, tiny_llm_dir, steps=2)
    assert _train("align", config, data["align"], tmp_path / "run") == 0
    err = capsys.readouterr().err
    assert "samples_s=" in err and "tokens_s=" in err and "step" in err


def test_data_parallel_under_torchrun_uses_the_same_command(data, tiny_llm_dir, tmp_path):
    """Two CPU processes (gloo) run the same `medvlm train` command data-parallel."""
    config = write_config(tmp_path, tiny_llm_dir, steps=2, batch_size=2)
    out = tmp_path / "ddp"
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [str(torchrun), "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "vlm.cli", "train", "instruct",
         "--config", str(config), "--train-data", str(data["instruct"]), "--out", str(out), "--device", "cpu"],
        capture_output=True, text=True, timeout=600, env=env, cwd=PROJECT,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(_losses(out)) == 2  # one row per step, written by rank 0 only
    assert (out / "final" / "adapter" / "adapter_model.safetensors").is_file()


class _ScriptedStage:
    """evaluate() returns the next scripted metrics; save() records the step it was called at."""

    def __init__(self, scripted: list[dict]):
        self.scripted, self.step = list(scripted), 0

    def evaluate(self, model, val_set):
        return self.scripted.pop(0)

    def save(self, model, folder: Path):
        (folder / "step.txt").write_text(str(self.step))


@pytest.mark.parametrize("metric, values, best_step", [("auroc/val/mean", [0.60, 0.65, 0.62], 2),
                                                       ("val_loss", [3.0, 2.5, 2.7], 2),
                                                       ("val_loss", [2.0, 2.5, 2.7], 1)])
def test_keep_best_keeps_the_model_of_the_best_evaluation(metric, values, best_step, tmp_path):
    from train.logs import MetricsLog
    from train.loop import _evaluate

    stage = _ScriptedStage([{metric: v} for v in values])
    log = MetricsLog(tmp_path, enabled=True, tensorboard=False, resume_step=0)
    for step in (1, 2, 3):
        stage.step = step
        _evaluate(stage, None, [], step, log, tmp_path, metric)
    assert (tmp_path / "best" / "step.txt").read_text() == str(best_step)
    assert json.loads((tmp_path / "best.json").read_text()) == {"metric": metric, "value": values[best_step - 1],
                                                               "step": best_step}


def test_keep_best_names_the_metrics_when_it_is_not_one(tmp_path):
    from train.logs import MetricsLog
    from train.loop import _evaluate
    from vlm.errors import ConfigError

    log = MetricsLog(tmp_path, enabled=True, tensorboard=False, resume_step=0)
    with pytest.raises(ConfigError, match="auroc/val/mean.*val_loss"):
        _evaluate(_ScriptedStage([{"val_loss": 1.0}]), None, [], 1, log, tmp_path, "auroc/val/mean")
