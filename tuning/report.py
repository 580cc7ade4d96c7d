"""The sweep report: a table of trials, the Pareto front of accuracy vs size, a PNG.

Pure functions over plain rows (one dict per trial) so they are tested without Ray:

- :func:`pareto_front` marks the trials that no other trial beats on both axes
  (fewer or equal parameters AND higher or equal accuracy, one of them strictly);
- :func:`format_table` renders the rows as a fixed-width text table;
- :func:`plot_pareto` draws accuracy against parameter count (log x), the front as
  a step line, the best trial as a star, and writes a PNG (matplotlib, Agg backend).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

# Table columns: (row key, header, format).
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("trial", "trial", "{}"),
    ("temperature", "T", "{:.3g}"),
    ("weight", "λ", "{:.3g}"),
    ("width", "width", "{:.4g}"),
    ("lr", "lr", "{:.2g}"),
    ("hint_weight", "β", "{:.3g}"),
    ("depth", "depth", "{}"),
    ("divergence", "divergence", "{}"),
    ("params", "params", "{:,}"),
    ("val_ce", "val CE", "{:.4f}"),
    ("val_agreement", "agree", "{:.4f}"),
    ("val_accuracy", "val acc", "{:.4f}"),
    ("test_accuracy", "test acc", "{:.4f}"),
    ("epochs", "epochs", "{}"),
    ("status", "status", "{}"),
)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def pareto_front(rows: Sequence[Mapping[str, Any]], *, size_key: str = "params",
                 score_key: str = "val_accuracy", higher_is_better: bool = True) -> list[int]:
    """Returns the indices of the Pareto-optimal rows (small size, best score), by size.

    Rows without a finite size or score are never on the front. ``higher_is_better``
    False: a low score is better (cross-entropy).
    """
    sign = 1 if higher_is_better else -1
    points = [(i, r.get(size_key), r.get(score_key)) for i, r in enumerate(rows)]
    points = [(i, s, sign * a) if _finite(a) else (i, s, a) for i, s, a in points]
    points = [(i, s, a) for i, s, a in points if _finite(s) and _finite(a)]
    front = []
    for i, size, score in points:
        dominated = any(
            s2 <= size and a2 >= score and (s2 < size or a2 > score) for j, s2, a2 in points if j != i
        )
        if not dominated:
            front.append((size, -score, i))
    return [i for _, _, i in sorted(front)]


def _cell(row: Mapping[str, Any], key: str, fmt: str) -> str:
    value = row.get(key)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


def format_table(rows: Sequence[Mapping[str, Any]], *, front: Sequence[int] = (), best: int | None = None) -> str:
    """Renders the trials as a text table; ``*`` marks the Pareto front, ``best`` the chosen trial.

    Columns whose values are all missing (``lr`` when it is not swept) are left out.
    """
    columns = [c for c in COLUMNS if any(r.get(c[0]) is not None for r in rows) or c[0] == "trial"]
    header = ["", *[c[1] for c in columns]]
    body = []
    for index, row in enumerate(rows):
        mark = ("B" if index == best else " ") + ("*" if index in front else " ")
        body.append([mark, *[_cell(row, key, fmt) for key, _, fmt in columns]])
    widths = [max(len(line[k]) for line in [header, *body]) for k in range(len(header))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(line, widths)) for line in [header, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    score = "held-out CE" if any(r.get("val_ce") is not None for r in rows) else "accuracy"
    lines.append(f"B = best trial, * = Pareto front (fewest params for its {score})")
    return "\n".join(lines)


def plot_pareto(rows: Sequence[Mapping[str, Any]], path: str | Path, *, title: str,
                score_key: str = "val_accuracy", best: int | None = None, higher_is_better: bool = True) -> Path:
    """Plots a score (accuracy, or held-out cross-entropy) against student size with the Pareto
    front marked; writes a PNG.

    Args:
        rows: Trial rows with ``params`` and ``score_key`` (optionally ``test_accuracy``).
        path: Destination PNG.
        title: Figure title (the sweep name).
        score_key: The accuracy on the y axis (the front is computed on it).
        best: Index of the best trial, drawn as a star.
        higher_is_better: False for a score that is better low (``val_ce``).

    Returns:
        The PNG path.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    front = pareto_front(rows, score_key=score_key, higher_is_better=higher_is_better)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    points = [(r.get("params"), r.get(score_key)) for r in rows]
    xs = [p for p, a in points if _finite(p) and _finite(a)]
    ys = [a for p, a in points if _finite(p) and _finite(a)]
    ax.scatter(xs, ys, s=28, color="tab:blue", alpha=0.7, label=f"trials ({score_key})")
    tests = [(r.get("params"), r.get("test_accuracy")) for r in rows]
    tests = [(p, a) for p, a in tests if _finite(p) and _finite(a)]
    if tests:
        ax.scatter(*zip(*tests), s=18, marker="x", color="tab:gray", alpha=0.6, label="test accuracy")
    if front:
        fx = [rows[i]["params"] for i in front]
        fy = [rows[i][score_key] for i in front]
        ax.step(fx, fy, where="post", color="tab:red", linewidth=1.5)
        ax.scatter(fx, fy, s=60, facecolors="none", edgecolors="tab:red", linewidths=1.5, label="Pareto front")
    if best is not None and _finite(rows[best].get("params")) and _finite(rows[best].get(score_key)):
        ax.scatter([rows[best]["params"]], [rows[best][score_key]], s=160, marker="*", color="gold",
                   edgecolors="black", zorder=5, label=f"best ({rows[best].get('trial')})")
    if xs and min(xs) > 0:
        ax.set_xscale("log")
    ax.set_xlabel("student parameters")
    ax.set_ylabel(score_key.replace("_", " "))
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right" if higher_is_better else "upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
    return path
