"""Several processes (torchrun, gloo on CPU): the same scores as one process, bitwise, whatever the
number of processes; one target on two ranks; a rank killed mid-run and a resumed rerun; the CLI
under torchrun writes its result once."""

import os
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(__file__)
WORKER = os.path.join(HERE, "dist_worker.py")
pytestmark = pytest.mark.slow


def _run(out, *args, nproc=1, check=True):
    cmd = (
        [sys.executable, WORKER, str(out), *args]
        if nproc == 1
        else [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={nproc}",
            WORKER,
            str(out),
            *args,
        ]
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    if check:
        assert p.returncode == 0, p.stderr[-3000:]
    return p


def _scores(out, nproc):
    got = [torch.load(os.path.join(out, f"rank{r}.pt")) for r in range(nproc)]
    for g in got[1:]:  # every rank returns the full result
        assert torch.equal(g["scores"], got[0]["scores"]) and g["steps"] == got[0]["steps"]
        assert torch.equal(g["exact"], got[0]["exact"]) and g["pairs"] == got[0]["pairs"]
    assert got[0]["meta_world"] == nproc
    return got[0]


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["--targets-per-batch", "2"],
        ["--independent-noise"],
        ["--targets", "1"],
        ["--streamed", "--targets-per-batch", "2"],
        ["--streamed", "--images", "37", "--targets-per-batch", "2"],
        ["--adaptive", "5", "--targets-per-batch", "2"],
    ],
    ids=["K1", "K2", "independent", "one-target", "streamed", "streamed-N37", "adaptive"],
)
def test_two_processes_give_the_scores_of_one_bitwise(tmp_path, args):
    one = _scores(_run(tmp_path / "one", *args) and tmp_path / "one", 1)
    two = _scores(_run(tmp_path / "two", *args, nproc=2) and tmp_path / "two", 2)
    assert torch.equal(one["scores"], two["scores"])
    assert torch.equal(one["exact"], two["exact"]) and one["pairs"] == two["pairs"]
    assert one["scores"].abs().max() > 1e-3 and torch.isfinite(one["scores"]).all()
    if "--adaptive" in args:  # it did set images aside (else this is the exact case again)
        assert not one["exact"].all()


def test_a_killed_rank_and_a_resumed_rerun_give_the_uninterrupted_result(tmp_path):
    ref = _scores(_run(tmp_path / "ref") and tmp_path / "ref", 1)
    run_dir = tmp_path / "run"
    p = _run(
        tmp_path / "killed",
        "--run-dir",
        str(run_dir),
        "--die-after-blocks",
        "1",
        nproc=2,
        check=False,
    )
    assert p.returncode != 0  # rank 1 SIGKILLed itself after the first block; the job stopped
    assert sorted(os.listdir(run_dir / "targets")) == [
        "000000.safetensors"
    ]  # block 1 persisted, no more
    assert len(os.listdir(run_dir / "loss_t")) > 1  # L_t persisted per shard, by both ranks
    _run(tmp_path / "resumed", "--run-dir", str(run_dir), "--resume", nproc=2)
    assert torch.equal(_scores(tmp_path / "resumed", 2)["scores"], ref["scores"])


def test_an_error_on_one_rank_stops_the_job_with_its_message(tmp_path):
    import time

    t0 = time.perf_counter()
    p = _run(tmp_path / "out", "--targets", "2", "--fail-on-rank1", nproc=2, check=False)
    assert p.returncode != 0 and "the model blew up on rank 1" in p.stderr
    assert time.perf_counter() - t0 < 120  # torchrun stops the other rank: no hang


def test_cli_under_torchrun_writes_once_and_matches_one_process(tmp_path):
    import mucs_fast as mf
    from mucs_fast.denoisers import EDMDenoiser
    from mucs_fast.models import DiT
    from mucs_fast.train import save_checkpoint

    torch.manual_seed(0)
    net = DiT((1, 4, 4), label_dim=0, patch_size=2, width=8, depth=1, heads=1, cond_width=8)
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.2)
    save_checkpoint(tmp_path / "model.pt", EDMDenoiser(net, train_lr=2e-2))
    g = torch.Generator().manual_seed(0)
    torch.save(torch.rand(24, 1, 4, 4, generator=g) * 2 - 1, tmp_path / "train.pt")
    torch.save(torch.rand(2, 1, 4, 4, generator=g) * 2 - 1, tmp_path / "targets.pt")

    def cli(out, nproc):
        launch = (
            [sys.executable, "-m", "mucs_fast"]
            if nproc == 1
            else [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                f"--nproc-per-node={nproc}",
                "-m",
                "mucs_fast",
            ]
        )
        cmd = [
            *launch,
            "attribute",
            "--model",
            str(tmp_path / "model.pt"),
            "--train",
            str(tmp_path / "train.pt"),
            "--targets",
            str(tmp_path / "targets.pt"),
            "--out",
            str(out),
            "--num-noises",
            "4",
            "--batch-size",
            "4",
            "--max-steps",
            "3",
            "--loss-null",
            "1.0",
            "--device",
            "cpu",
            "--quiet",
        ]
        p = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            timeout=300,
        )
        assert p.returncode == 0, p.stderr[-3000:]
        return mf.Attribution.load(out)

    one, two = cli(tmp_path / "one", 1), cli(tmp_path / "two", 2)
    assert torch.equal(one.scores, two.scores) and one.scores.abs().max() > 0
    assert two.meta["world_size"] == 2
    assert not any(
        e.startswith("rank") for e in os.listdir(tmp_path / "two")
    )  # one result, not one per rank
