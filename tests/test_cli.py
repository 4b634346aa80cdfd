"""`mucs-fast` on inputs that must not hurt: --model never unpickles unless asked (--trust-pickle),
bad flags fail in one line before anything heavy, Ctrl-C says how to resume, the result directory
is written once, and report.png prints small scores legibly. Models: a tiny DiT (1×4×4)."""

import ast
import inspect
import json
import math
import os

import pytest
import torch

from mucs_fast import cli, cli_common
from mucs_fast.cli_common import cli_message, load_model, parse_loss_null
from mucs_fast.denoisers import EDMDenoiser
from mucs_fast.models import DiT
from mucs_fast.report import format_score
from mucs_fast.train import save_checkpoint

N, C, H = 8, 1, 4


class _RunsCode:
    """Unpickling this opens (creates) `marker`: the smallest "checkpoint" that runs code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _tiny_dit_checkpoint(path, train_lr=2e-3):
    torch.manual_seed(0)
    net = DiT((C, H, H), label_dim=0, patch_size=2, width=8, depth=1, heads=1, cond_width=8)
    save_checkpoint(path, EDMDenoiser(net, train_lr=train_lr))
    return path


@pytest.fixture
def data(tmp_path):
    g = torch.Generator().manual_seed(0)
    torch.save(torch.rand(N, C, H, H, generator=g) * 2 - 1, tmp_path / "train.pt")
    torch.save(torch.rand(2, C, H, H, generator=g) * 2 - 1, tmp_path / "targets.pt")
    return tmp_path


def _argv(d, model, out, *extra):
    return [
        "attribute",
        "--model",
        str(model),
        "--train",
        str(d / "train.pt"),
        "--targets",
        str(d / "targets.pt"),
        "--out",
        str(out),
        "--num-noises",
        "4",
        "--batch-size",
        "4",
        "--max-steps",
        "1",
        "--loss-null",
        "1.0",
        "--device",
        "cpu",
        "--quiet",
        *extra,
    ]


def _one_error_line(err):
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert "Traceback" not in err
    assert lines and lines[-1].startswith("[mucs-fast] error: "), err
    return lines[-1]


# -- 1. --model never unpickles by default
# ----------------------------------------------------------
def test_a_model_file_that_runs_code_is_refused_without_trust_pickle(data, capsys):
    marker = data / "code-ran"
    torch.save({"format": "mucs_fast.dit", "net": _RunsCode(marker)}, data / "evil.pt")
    assert cli.main(_argv(data, data / "evil.pt", data / "out")) == 2
    assert not marker.exists()  # nothing ran
    line = _one_error_line(capsys.readouterr().err)
    assert "not a weights-only checkpoint" in line and "--trust-pickle" in line
    with pytest.raises(ValueError, match="--trust-pickle"):
        load_model(str(data / "evil.pt"))
    assert not marker.exists()
    # The test's own check: the file does run code once unpickling is allowed, with a warning first.
    assert cli.main(_argv(data, data / "evil.pt", data / "out", "--trust-pickle")) == 2
    assert marker.exists()
    assert "runs whatever code the file holds" in capsys.readouterr().err


def test_a_mucs_fast_checkpoint_loads_weights_only(tmp_path, monkeypatch):
    path = _tiny_dit_checkpoint(tmp_path / "m.pt")
    calls = []
    real = torch.load

    def spy(*a, **kw):
        calls.append(kw.get("weights_only"))
        return real(*a, **kw)

    monkeypatch.setattr(torch, "load", spy)
    den = load_model(str(path))
    assert isinstance(den, EDMDenoiser) and isinstance(den.net, DiT) and den.train_lr == 2e-3
    assert calls and all(w is True for w in calls)


def test_a_saved_module_needs_trust_pickle(tmp_path, capsys):
    from nets import TinyEDMNet

    torch.save(TinyEDMNet(C=1, width=4), tmp_path / "module.pt")
    with pytest.raises(ValueError, match=r"TinyEDMNet.*--trust-pickle"):
        load_model(str(tmp_path / "module.pt"))
    den = load_model(str(tmp_path / "module.pt"), trust_pickle=True)
    assert isinstance(den, EDMDenoiser) and isinstance(den.net, TinyEDMNet)
    assert "--trust-pickle: unpickling" in capsys.readouterr().err


def test_a_state_dict_is_named_as_such(tmp_path):
    torch.save({"w": torch.zeros(2)}, tmp_path / "sd.pt")
    with pytest.raises(ValueError, match="a state dict"):
        load_model(str(tmp_path / "sd.pt"))


def test_a_diffusers_folder_loads_its_safetensors_and_refuses_bin_pickles(tmp_path):
    pytest.importorskip("diffusers")
    from mucs_fast.denoisers import DiffusersDenoiser
    from mucs_fast.models import ddpm_scheduler, tiny_unet

    torch.manual_seed(0)
    unet, sched = tiny_unet(1, 8), ddpm_scheduler(10)
    unet.save_pretrained(tmp_path / "safe")
    sched.save_pretrained(tmp_path / "safe" / "scheduler")
    den = load_model(str(tmp_path / "safe"))
    assert isinstance(den, DiffusersDenoiser)
    assert torch.equal(den.net.conv_in.weight, unet.conv_in.weight)

    unet.save_pretrained(tmp_path / "bin", safe_serialization=False)
    sched.save_pretrained(tmp_path / "bin" / "scheduler")
    assert not any(n.endswith(".safetensors") for n in os.listdir(tmp_path / "bin"))
    with pytest.raises(ValueError, match=r"pickles \(\.bin\).*--trust-pickle"):
        load_model(str(tmp_path / "bin"))
    assert isinstance(load_model(str(tmp_path / "bin"), trust_pickle=True), DiffusersDenoiser)


# -- 3. one-line errors, before the model or the data is read
# ---------------------------------------
@pytest.fixture
def nothing_loads(monkeypatch):
    """Fail the test if the command gets as far as reading data or the model."""

    def boom(*a, **kw):
        raise AssertionError("read data or model before checking the flags")

    monkeypatch.setattr(cli, "load_images", boom)
    monkeypatch.setattr(cli, "load_model", boom)


def _fails(capsys, argv):
    assert cli.main(argv) == 2
    return _one_error_line(capsys.readouterr().err)


def test_out_that_is_a_file(data, capsys, nothing_loads):
    (data / "out.txt").write_text("x")
    line = _fails(capsys, _argv(data, data / "train.pt", data / "out.txt"))
    assert f"--out {data / 'out.txt'} is an existing file" in line


def test_out_that_cannot_be_created_or_written(data, capsys, nothing_loads):
    (data / "afile").write_text("x")
    line = _fails(capsys, _argv(data, data / "train.pt", data / "afile" / "out"))
    assert "--out" in line and "cannot create the folder" in line
    if os.geteuid() != 0:  # root writes anywhere
        (data / "ro").mkdir(mode=0o500)
        line = _fails(capsys, _argv(data, data / "train.pt", data / "ro"))
        assert "--out" in line and "cannot write there" in line


def test_out_that_is_another_folder_or_in_use(data, capsys, nothing_loads):
    (data / "photos").mkdir()
    (data / "photos" / "cat.png").write_bytes(b"png")
    line = _fails(capsys, _argv(data, data / "train.pt", data / "photos"))
    assert "--out" in line and "not a mucs_fast run directory" in line and "run_dir" not in line


@pytest.mark.parametrize("device,expect", [("foo", "not a device name"), ("cuda:99", "cuda")])
def test_unknown_or_unavailable_device(data, capsys, nothing_loads, device, expect):
    if device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.device_count() > 99:
        pytest.skip("this machine has 100 GPUs")
    line = _fails(capsys, _argv(data, data / "train.pt", data / "out", "--device", device))
    assert f"--device {device}" in line and expect in line


def test_cuda_on_a_machine_without_it(data, capsys, nothing_loads):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    line = _fails(capsys, _argv(data, data / "train.pt", data / "out", "--device", "cuda"))
    assert "--device cuda: no cuda device is available" in line


@pytest.mark.parametrize("value", ["abc", "-1", "0", "nan", "inf"])
def test_loss_null_that_is_not_auto_or_a_positive_number(data, capsys, nothing_loads, value):
    line = _fails(capsys, _argv(data, data / "train.pt", data / "out", "--loss-null", value))
    assert (
        line
        == f'[mucs-fast] error: --loss-null: expected "auto" or a positive number, got {value!r}'
    )
    assert parse_loss_null("auto") == "auto" and parse_loss_null("0.5") == 0.5


def test_config_errors_name_flags(data, capsys, nothing_loads):
    line = _fails(capsys, _argv(data, data / "train.pt", data / "out", "--num-noises", "0"))
    assert "--num-noises: expected an int >= 1, got 0" in line and "MUCSConfig" not in line


def test_engine_messages_name_flags_unknown_training_lr(data, capsys):
    """A model that records no training lr, and no --lr: the engine's message, in CLI words."""
    model = _tiny_dit_checkpoint(data / "m.pt", train_lr=None)
    line = _fails(capsys, _argv(data, model, data / "out"))
    assert "--lr" in line and "MUCSConfig" not in line and "train_lr=" not in line


def test_cli_message_rewords_config_names():
    assert (
        cli_message("exceeds N=8; pass MUCSConfig(batch_size=<= 8)")
        == "exceeds N=8; pass --batch-size <= 8"
    )
    assert (
        cli_message("pass a number as MUCSConfig(loss_null=...)")
        == "pass a number as --loss-null <value>"
    )
    assert cli_message("MUCSConfig.lr is None and") == "--lr is not given and"
    assert (
        cli_message("pass MUCSConfig(frozen=...)") == "pass MUCSConfig(frozen=...)"
    )  # no such flag
    assert cli_message("run_dir /x is in use\nby process 3") == "--out /x is in use by process 3"


# -- 4. Ctrl-C ------------------------------------------------------------------------------------
def _main_catching_ctrl_c(argv):
    try:
        return cli.main(argv)
    except KeyboardInterrupt:  # escaping, it would stop the whole test session
        pytest.fail("KeyboardInterrupt escaped mucs_fast.cli.main")


def test_ctrl_c_during_attribute_says_how_to_resume(data, capsys, monkeypatch):
    from mucs_fast.rundir import RunDir

    def interrupted(den, train, targets, cfg, run_dir=None, resume=False, **kw):
        run = RunDir(run_dir, {"k": 1}, resume)
        run.save_target(0, torch.zeros(N), {"steps": 1})
        raise KeyboardInterrupt  # while the second target runs

    monkeypatch.setattr(cli, "attribute", interrupted)
    out = data / "out"
    assert _main_catching_ctrl_c(_argv(data, _tiny_dit_checkpoint(data / "m.pt"), out)) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        f"[mucs-fast] interrupted: finished targets (1 so far) are kept in {out}; rerun the same "
        "command "
        "with --resume to continue"
    )


def test_ctrl_c_during_the_demo(tmp_path, capsys, monkeypatch):
    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "load_digits", interrupted)
    assert (
        _main_catching_ctrl_c(
            ["demo", "--quick", "--out", str(tmp_path / "demo"), "--device", "cpu"]
        )
        == 130
    )
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith(
        "[mucs-fast] interrupted"
    )


# -- 5. no import cycle ---------------------------------------------------------------------------
def _imports(module):
    tree = ast.parse(inspect.getsource(module))
    return {
        ("." * n.level) + (n.module or "") for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
    } | {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}


def test_compat_cli_and_cli_common_do_not_import_the_cli():
    import mucs_fast.compat.cli as compat_cli

    assert not {"..cli", "mucs_fast.cli"} & _imports(compat_cli)
    assert not {
        ".cli",
        ".compat.cli",
        ".compat",
        "mucs_fast.cli",
        "mucs_fast.compat.cli",
    } & _imports(cli_common)
    assert compat_cli.load_model is cli_common.load_model is cli.load_model


# -- 6. the result directory is written once ------------------------------------------------------
def test_attribute_writes_the_result_once_with_top_k(data, capsys, monkeypatch):
    import mucs_fast.report
    from mucs_fast import Attribution

    saves, formatted = [], []
    real_save, real_format = Attribution.save, mucs_fast.report.format_score
    monkeypatch.setattr(
        Attribution,
        "save",
        lambda self, path, top_k=None: (saves.append(top_k), real_save(self, path, top_k))[1],
    )
    monkeypatch.setattr(
        mucs_fast.report, "format_score", lambda s: (formatted.append(s), real_format(s))[1]
    )
    out = data / "out"
    assert cli.main(_argv(data, _tiny_dit_checkpoint(data / "m.pt"), out, "--top-k", "3")) == 0
    assert saves == [3]  # by the engine, into the run directory; not again by the CLI
    res = Attribution.load(out)
    assert (
        res.scores.shape == (2, N)
        and json.loads((out / "attribution.json").read_text())["top_k"] == 3
    )
    assert (out / "report.png").stat().st_size > 0 and len(formatted) == 2 * min(8, N)
    assert "Traceback" not in capsys.readouterr().err


def test_attribute_adaptive_scores_the_top_k_exactly_and_says_so(data, capsys):
    from mucs_fast import Attribution

    out = data / "out"
    assert (
        cli.main(
            _argv(data, _tiny_dit_checkpoint(data / "m.pt"), out, "--top-k", "2", "--adaptive")
        )
        == 0
    )
    res = Attribution.load(out)
    meta = json.loads((out / "attribution.json").read_text())
    assert meta["config"]["adaptive_top_k"] == 2 and meta["adaptive"]["top_k"] == 2
    assert len(meta["adaptive"]["targets"]) == 2 and len(meta["pairs_evaluated"]) == 2
    assert res.exact.shape == (2, N) and res.exact.sum(1).min() >= 2  # at least the top-k are exact
    assert "adaptive (top 2)" in capsys.readouterr().err


def test_attribute_on_reference_files_writes_the_result_once_with_its_meta(tmp_path, monkeypatch):
    from mucs_fast import Attribution
    from mucs_fast.compat.reference_files import save_dataset, save_samples

    g = torch.Generator().manual_seed(0)
    x = torch.rand(N, C, H, H, generator=g) * 2 - 1
    y = torch.nn.functional.one_hot(torch.arange(N) % 3, 3).float()
    save_dataset(tmp_path / "data", x, y, threads=1)
    save_samples(tmp_path / "samples.pt", torch.arange(3), x[:3], y[:3], x[:3] * 0.9, {})
    saves = []
    real_save = Attribution.save
    monkeypatch.setattr(
        Attribution,
        "save",
        lambda self, path, top_k=None: (saves.append(top_k), real_save(self, path, top_k))[1],
    )
    out = tmp_path / "out"
    argv = [
        "attribute",
        "--model",
        str(_tiny_dit_checkpoint(tmp_path / "m.pt")),
        "--reference-samples",
        str(tmp_path / "samples.pt"),
        "--reference-data",
        str(tmp_path / "data"),
        "--num-attrib",
        "2",
        "--out",
        str(out),
        "--num-noises",
        "4",
        "--batch-size",
        "4",
        "--max-steps",
        "1",
        "--loss-null",
        "1.0",
        "--top-k",
        "5",
        "--device",
        "cpu",
        "--quiet",
    ]
    assert cli.main(argv) == 0
    assert saves == [5]
    meta = json.loads((out / "attribution.json").read_text())
    assert meta["top_k"] == 5 and meta["reference_files"]["num_attrib"] == 2
    assert (out / "attrib-ids.pt").is_file() and (out / "report.png").is_file()


# -- 7. report.png scores -------------------------------------------------------------------------
def test_report_scores_keep_three_significant_digits_at_any_scale():
    assert format_score(-1.234e-5) == "-1.23e-5"  # was "-0.0000"
    assert format_score(4.56e-7) == "+4.56e-7"
    assert format_score(0.01234) == "+0.0123"
    assert format_score(-0.5) == "-0.5"
    assert format_score(412.3) == "+412"
    assert format_score(0.0) == "0" and format_score(math.nan) == "nan"
    for x in (3.21e-9, -7.77e-6, 1.5e-3, 0.25, -12.5, 9.87e5):
        s = format_score(x)
        assert len(s) <= 9 and abs(float(s) - x) <= 5e-3 * abs(x), (x, s)
