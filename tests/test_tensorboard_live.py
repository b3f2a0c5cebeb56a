"""Live TensorBoard, end to end: a real TensorBoard server serves the probe's values while the fit is still running.

Three processes: the fit (a small Lightning run with ``CurvatureStabilityCallback`` and a ``TensorBoardLogger``), a
TensorBoard server started with ``tensorboard.program.TensorBoard`` on 127.0.0.1 (port chosen free by the OS) on the
fit's log directory, and this test, which reads ``curvprobe/delta2`` and the histogram ``curvprobe/eigenvalues``
through TensorBoard's HTTP data API only. The fit paces itself: after each validation epoch it waits (at most 20 s)
until the reader reports how many distinct steps it has seen, so a slow CI machine cannot end the fit before the
server reloads, and a server that never shows new points makes the fit run out its waits and end, which fails the
test. Every loop is bounded in time and count; both processes are stopped in ``finally``.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import select
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EPOCHS = 3
RUN = "live/version_0"

FIT = r'''
import json, os, sys, time
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch
import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, TensorDataset
from lightning_curvprobe import CurvatureStabilityCallback

logdir, ack, epochs = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch.set_num_threads(1)
g = torch.Generator().manual_seed(0)
x = torch.randn(256, 4, generator=g)
y = torch.sin(x @ torch.randn(4, 1, generator=g))


class Net(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))

    def training_step(self, batch, batch_idx):
        return torch.nn.functional.mse_loss(self.net(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", torch.nn.functional.mse_loss(self.net(batch[0]), batch[1]))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


class Pace(Callback):
    """After each validation epoch (its values are written and flushed by then), wait until the reader has seen it."""

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        want, deadline = trainer.current_epoch + 1, time.monotonic() + 20.0
        while time.monotonic() < deadline:
            try:
                if int(open(ack).read().strip() or 0) >= want:
                    return
            except (OSError, ValueError):
                pass
            time.sleep(0.05)


probe = CurvatureStabilityCallback(num_eigenvectors=3, sigma=1e-2, num_probe_samples=32, num_added_samples=4)
trainer = L.Trainer(
    max_epochs=epochs,
    callbacks=[probe, Pace()],
    logger=TensorBoardLogger(logdir, name="live", version=0),
    enable_checkpointing=False,
    enable_progress_bar=False,
    enable_model_summary=False,
    num_sanity_val_steps=0,
    limit_train_batches=4,
)
train = DataLoader(TensorDataset(x[:192], y[:192]), batch_size=48)
trainer.fit(Net(), train, DataLoader(TensorDataset(x[192:], y[192:]), batch_size=64))
json.dump(probe.history, open(os.path.join(logdir, "history.json"), "w"))
'''

SERVER = r"""
import sys, threading
from tensorboard import program
tb = program.TensorBoard()
tb.configure(argv=[None, "--logdir", sys.argv[1], "--host", "127.0.0.1", "--port", "0", "--reload_interval", "0.3",
                   "--load_fast", "false"])
print(tb.launch(), flush=True)
threading.Event().wait()
"""


def _get(url: str) -> object:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read().decode())


def _series(base: str, plugin: str, kind: str, tag: str) -> list:
    query = urllib.parse.urlencode({"run": RUN, "tag": tag})
    try:
        return _get(f"{base}data/plugin/{plugin}/{kind}?{query}")  # type: ignore[return-value]
    except (urllib.error.HTTPError, urllib.error.URLError, TimeoutError, ConnectionError):
        return []  # run or tag not loaded yet


def _read_url(proc: subprocess.Popen, deadline: float) -> str:
    """The server's first stdout line (its URL), waiting at most until ``deadline``."""
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.2)
        if ready:
            line = proc.stdout.readline()
            match = re.match(r"(http://127\.0\.0\.1:\d+/)", line.strip())
            assert match, f"unexpected TensorBoard output: {line!r}"
            return match.group(1)
        assert proc.poll() is None, f"TensorBoard exited: {proc.stderr.read() if proc.stderr else ''}"
    raise AssertionError("TensorBoard did not print its URL within the time limit")


def _plot_script():
    spec = importlib.util.spec_from_file_location("plot_tensorboard", ROOT / "examples" / "plot_tensorboard.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _stop(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.mark.slow
def test_delta2_and_eigenvalue_histogram_appear_live_in_tensorboard(tmp_path):
    logdir, ack = tmp_path / "tb", tmp_path / "seen"
    logdir.mkdir()
    ack.write_text("0")
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", PYTHONPATH=str(ROOT))
    server = fit = None
    start = time.monotonic()
    try:
        server = subprocess.Popen(
            [sys.executable, "-c", SERVER, str(logdir)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        fit = subprocess.Popen(
            [sys.executable, "-c", FIT, str(logdir), str(ack), str(EPOCHS)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=tmp_path,
        )
        base = _read_url(server, start + 30)
        assert base.startswith("http://127.0.0.1:")
        seen_scalars: dict[int, float] = {}
        seen_hist: dict[int, list] = {}
        live_steps: set[int] = set()  # steps seen in both series while the fit was still running
        polls = 0
        deadline = start + 120
        while time.monotonic() < deadline and polls < 600:
            polls += 1
            running = fit.poll() is None
            for _, step, value in _series(base, "scalars", "scalars", "curvprobe/delta2"):
                seen_scalars[int(step)] = value
            for _, step, buckets in _series(base, "histograms", "histograms", "curvprobe/eigenvalues"):
                seen_hist[int(step)] = buckets
            both = set(seen_scalars) & set(seen_hist)
            if running:
                live_steps |= both
                ack.write_text(str(len(both)))  # lets the fit go on to its next epoch
            elif len(both) >= EPOCHS:
                break  # the fit has ended and the server has loaded its last point
            time.sleep(0.1)
        assert fit.wait(timeout=30) == 0, fit.stderr.read() if fit.stderr else ""
        assert len(live_steps) >= 2, f"distinct steps seen before the fit ended: {sorted(live_steps)}"
        assert len(set(seen_scalars) & set(seen_hist)) == EPOCHS
        # what TensorBoard served is what the callback logged, at the steps the epochs ended on
        history = json.loads((logdir / "history.json").read_text())
        served = [seen_scalars[s] for s in sorted(seen_scalars)]
        assert served == pytest.approx([h["delta2"] for h in history], rel=1e-6)
        assert all(math.isfinite(v) and v > 0 for v in served)
        for step, buckets in seen_hist.items():
            counts = sum(b[2] for b in buckets)
            assert counts == pytest.approx(3), (step, buckets)  # the D = 3 top eigenvalues
        hist_max = {step: max(b[1] for b in buckets) for step, buckets in seen_hist.items()}
        for step, h in zip(sorted(hist_max), history, strict=True):
            assert hist_max[step] == pytest.approx(h["lambda_max"], rel=1e-3, abs=1e-6)
        # examples/plot_tensorboard.py reads the same points back from the event file (and draws them)
        script = _plot_script()
        series = script.read_scalars(logdir / RUN)
        assert [s for s, _ in series["delta2"]] == sorted(seen_scalars)
        assert [v for _, v in series["delta2"]] == pytest.approx(served, rel=1e-7)
        assert {"delta2_stderr", "lambda_max", "subspace_overlap", "hvps"} <= set(series)
        if importlib.util.find_spec("matplotlib") is not None:
            assert script.plot(series, tmp_path / "curves.png").stat().st_size > 10_000
        assert time.monotonic() - start < 120
    finally:
        _stop(fit)
        _stop(server)
    assert server.poll() is not None and fit.poll() is not None
