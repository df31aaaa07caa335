"""A validation bound against wall-clock minutes, for several runs in one plot (docs/evaluation.md:
recipes compared by time, not by epochs).

Minutes count from a run's first logged event (the first epoch's start); the bound is read from
each run's TensorBoard events. Points measured elsewhere (a run whose events are gone) can join as
`label=minutes:value,...`.

    python benchmarks/wall_clock_curves.py --run "new recipe=outputs/train/runs/<time>" \\
        --points "old recipe=6:98.2,12:95.2" --tag val/niwae --out docs/mnist_hour.png
"""

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import (  # noqa: E402
    EventAccumulator,
)


def curve(run_dir: Path, tag: str) -> tuple[list[float], list[float]]:
    """(minutes since the run's first event, values of `tag`) from the run's events."""
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    tags = events.Tags()["scalars"]
    if tag not in tags:
        raise SystemExit(f"{run_dir}: no {tag} in its events (it has {sorted(tags)})")
    start = min(s.wall_time for t in tags for s in events.Scalars(t))
    points = events.Scalars(tag)
    return [(s.wall_time - start) / 60 for s in points], [s.value for s in points]


def labelled(spec: str) -> tuple[str, str]:
    label, sep, rest = spec.rpartition("=")
    if not sep:
        raise SystemExit(f"expected label=value, got {spec!r}")
    return label, rest


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", action="append", default=[], help="label=run dir")
    parser.add_argument("--points", action="append", default=[],
                        help="label=minutes:value,minutes:value,...")
    parser.add_argument("--tag", default="val/niwae")
    parser.add_argument("--ylabel", default="validation -IWAE bound, K = 5 (nats)")
    parser.add_argument("--ymax", type=float, default=None)
    parser.add_argument("--target", type=float, default=None, help="a horizontal line")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for spec in args.run:
        label, run_dir = labelled(spec)
        minutes, values = curve(Path(run_dir), args.tag)
        ax.plot(minutes, values, label=label, lw=1.5)
        print(f"{label}: {len(values)} points, last {values[-1]:.2f} at {minutes[-1]:.1f} min")
    for spec in args.points:
        label, rest = labelled(spec)
        pairs = [tuple(map(float, p.split(":"))) for p in rest.split(",")]
        ax.plot(*zip(*pairs, strict=True), "o--", label=label, lw=1)
    if args.target is not None:
        ax.axhline(args.target, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("wall-clock minutes of training")
    ax.set_ylabel(args.ylabel)
    if args.ymax is not None:
        ax.set_ylim(top=args.ymax)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
