"""Pictures of the suite's results, where a picture reads better than a table: every grid (tau, epochs,
learning rate, amount of hard data) as its effect against the DPO model with the pooled 95 % interval as
a band and each seed's value as a dot; the per-sample table as before-vs-after scatters by category.
Plus the grids in TensorBoard's HParams tab."""

from __future__ import annotations

from pathlib import Path

from hsft.engine.tensorboard import TBWriter
from hsft.experiments.suites import Suite

__all__ = ["draw_plots", "log_hparams"]

COLOURS = {"Better": "#1a9850", "Stable": "#7f7f7f", "Worse": "#d73027"}
MARKERS = {"Hard": "o", "Easy": "^"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _grid_rows(body: dict) -> list[dict]:
    return sorted((r for r in body["rows"] if r.get("value") is not None), key=lambda r: r["value"])


def draw_grid(body: dict, x_label: str, log_x: bool, path: Path) -> None:
    plt = _pyplot()
    rows = _grid_rows(body)
    xs = [r["value"] for r in rows]
    with_train = any(r.get("train_dice") for r in rows)
    fig, axes = plt.subplots(1, 2 if with_train else 1, figsize=(10 if with_train else 5.5, 4), squeeze=False)
    ax = axes[0][0]
    ax.fill_between(xs, [r["delta_start"]["low"] for r in rows], [r["delta_start"]["high"] for r in rows],
                    alpha=0.25, label="95% interval (seeds x images)")
    ax.plot(xs, [r["delta_start"]["mean"] for r in rows], marker="o", label="mean")
    for row in rows:
        seeds = list(row["delta_start"]["per_seed"].values())
        ax.scatter([row["value"]] * len(seeds), seeds, s=12, color="black", alpha=0.6, zorder=3)
    ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.set_xlabel(x_label)
    ax.set_ylabel(f"Dice - DPO model's ({body.get('split_name', 'held-out')} split)")
    ax.set_title(f"{body['key']}: {x_label}")
    if log_x:
        ax.set_xscale("log")
    ax.legend(fontsize=8)
    if with_train:
        ax = axes[0][1]
        for key, label in (("dice", "held-out"), ("train_dice", "training split")):
            means = [r[key]["mean"] for r in rows]
            sds = [r[key]["sd"] for r in rows]
            ax.plot(xs, means, marker="o", label=label)
            ax.fill_between(xs, [m - s for m, s in zip(means, sds)], [m + s for m, s in zip(means, sds)], alpha=0.2)
        ax.set_xlabel(x_label)
        ax.set_ylabel("Dice (mean +- sd over seeds)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def draw_per_sample(body: dict, path: Path) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6), sharex=True, sharey=True)
    for ax, label in zip(axes, ("hsft", "control")):
        rows = body[label]["rows"]
        for difficulty in MARKERS:
            for change, colour in COLOURS.items():
                picked = [r for r in rows if r["difficulty"] == difficulty and r["change"] == change]
                if picked:
                    ax.scatter([r["before"] for r in picked], [r["after"] for r in picked], s=14, c=colour,
                               marker=MARKERS[difficulty], label=f"{difficulty} -> {change} ({len(picked)})")
        ax.plot([0, 1], [0, 1], color="grey", linewidth=0.8)
        ax.axvline(body["tau"], color="grey", linestyle=":", linewidth=0.8)
        ax.set_title(f"{label}: per held-out image, all seeds")
        ax.set_xlabel("Dice, DPO model")
        ax.legend(fontsize=7)
    axes[0].set_ylabel("Dice after")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def draw_plots(results: dict, suite: Suite, out_dir: Path) -> list[Path]:
    """One PNG per grid table and one for the per-sample table; returns the files written (none, with a
    note, where matplotlib is missing: a GPU machine given only the wheels that travel)."""
    try:
        _pyplot()
    except ImportError:
        print("[experiments] plots not drawn: matplotlib is not installed (pip install matplotlib); the tables "
              "and results.json are complete")
        return []
    written = []
    for table in suite.tables:
        body = results["tables"][table.key]
        path = Path(out_dir) / f"{table.key}.png"
        if table.kind == "arms" and table.x_label and len(_grid_rows(body)) >= 2:
            draw_grid(body, table.x_label, table.log_x, path)
        elif table.kind == "per_sample":
            draw_per_sample(body, path)
        else:
            continue
        written.append(path)
    return written


def log_hparams(results: dict, suite: Suite, log_dir: Path) -> None:
    """Every grid row as an HParams run: its table, its setting, its held-out Dice and effect."""
    tb = TBWriter(log_dir)
    for table in suite.tables:
        if table.kind != "arms" or not table.x_label:
            continue
        for row in results["tables"][table.key]["rows"]:
            if row.get("value") is None:
                continue
            tb.hparams({"table": table.key, "setting": table.x_label, "value": float(row["value"])},
                       {"hparams/heldout_dice": row["dice"]["mean"], "hparams/delta_vs_dpo": row["delta_start"]["mean"]},
                       run_name=f"{table.key}-{row['name']}")
    tb.close()
