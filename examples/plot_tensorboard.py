"""Draw the probe's curves from a TensorBoard event file: what the *Scalars* tab shows, as one PNG.

Reads the event file that ``CurvatureStabilityCallback`` wrote through a ``TensorBoardLogger`` (for example the
quickstart's) with TensorBoard's ``EventAccumulator`` and draws four panels: ``delta2`` with its standard-error band,
``lambda_max``, ``subspace_overlap`` and ``hvps``, against the training step::

    python examples/quickstart.py --out curvprobe_logs
    python examples/plot_tensorboard.py curvprobe_logs/quickstart/version_0 --out examples/quickstart_curves.png

Needs matplotlib (``pip install "lightning-curvprobe[plot]"``).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

KEYS = ("delta2", "delta2_stderr", "lambda_max", "subspace_overlap", "hvps")


def read_scalars(logdir: str | Path, prefix: str = "curvprobe") -> dict[str, list[tuple[int, float]]]:
    """``{key: [(step, value), ...]}`` for the probe's keys found in the event files under ``logdir``.

    Args:
        logdir: a run directory holding ``events.out.tfevents.*`` files (e.g. ``.../quickstart/version_0``).
        prefix: the callback's ``log_prefix``.

    Returns:
        The series of each key in :data:`KEYS` that the run logged, sorted by step.
    """
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})  # 0 = keep every point
    acc.Reload()
    tags = set(acc.Tags().get("scalars", []))
    out: dict[str, list[tuple[int, float]]] = {}
    for key in KEYS:
        tag = f"{prefix}/{key}"
        if tag in tags:
            out[key] = sorted((e.step, float(e.value)) for e in acc.Scalars(tag))
    if "delta2" not in out:
        raise ValueError(f"no '{prefix}/delta2' scalars in the event files under {logdir}; found tags {sorted(tags)}")
    return out


def plot(series: dict[str, list[tuple[int, float]]], out: str | Path, title: str = "") -> Path:
    """Four panels (delta2 ± stderr on a log axis, lambda_max, subspace_overlap, hvps) saved as a PNG at ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 6.4), sharex=True)
    steps, d2 = zip(*series["delta2"], strict=True)
    ax = axes[0][0]
    ax.plot(steps, d2, "o-", ms=3, color="C0", label="delta2")
    if "delta2_stderr" in series:
        se = dict(series["delta2_stderr"])
        lo = [max(v - se.get(s, math.nan), v * 1e-3) for s, v in zip(steps, d2, strict=True)]
        hi = [v + se.get(s, math.nan) for s, v in zip(steps, d2, strict=True)]
        ax.fill_between(steps, lo, hi, color="C0", alpha=0.25, label="± delta2_stderr")
    ax.set_yscale("log")
    ax.set_title("curvprobe/delta2: Δ₂^(D) with its standard error", fontsize=9)
    ax.legend(fontsize=8)
    panels = [
        (axes[0][1], "lambda_max", "curvprobe/lambda_max: largest Hessian eigenvalue", "C3"),
        (axes[1][0], "subspace_overlap", "curvprobe/subspace_overlap: ‖U_prevᵀU‖²_F / D (1 = unchanged)", "C2"),
        (axes[1][1], "hvps", "curvprobe/hvps: Hessian-vector products per refresh", "C4"),
    ]
    for ax, key, label, color in panels:
        if key in series:
            xs, ys = zip(*series[key], strict=True)
            ax.plot(xs, ys, "o-", ms=3, color=color)
        ax.set_title(label, fontsize=9)
    axes[1][0].set_ylim(top=1.02)
    for ax in axes[1]:
        ax.set_xlabel("training step")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("logdir", help="run directory with the event file, e.g. curvprobe_logs/quickstart/version_0")
    parser.add_argument("--out", default="quickstart_curves.png", help="PNG to write")
    parser.add_argument("--prefix", default="curvprobe", help="the callback's log_prefix")
    parser.add_argument("--title", default="", help="figure title")
    args = parser.parse_args(argv)
    series = read_scalars(args.logdir, args.prefix)
    path = plot(series, args.out, args.title)
    print(f"wrote {path} ({len(series['delta2'])} probes)")


if __name__ == "__main__":
    main()
