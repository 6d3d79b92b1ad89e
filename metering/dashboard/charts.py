"""Server-rendered SVG charts: no chart library, no script, nothing fetched.

Each chart is an inline `<svg role="img">` with a `<title>` and a `<desc>` naming what it
shows, and the page puts the same numbers in a table under it (`<details>`), so screen
readers and keyboards get the data too. Colours come from CSS classes (`s0`..`s5`), which
the stylesheet sets with enough contrast on both themes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from html import escape

Fmt = Callable[[float], str]

W, H = 420, 210
PAD_L, PAD_R, PAD_T, PAD_B = 58, 10, 10, 26


def compact(value: float) -> str:
    """3.8B, 24.5M, 210K, 950: three significant digits at most, no trailing .0."""
    sign = "-" if value < 0 else ""
    v = abs(value)
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if v >= size:
            scaled = v / size
            digits = 1 if scaled < 100 else 0
            text = f"{scaled:.{digits}f}".rstrip("0").rstrip(".")
            return f"{sign}{text}{unit}"
    if v == int(v):
        return f"{sign}{int(v)}"
    return f"{sign}{v:.2f}".rstrip("0").rstrip(".")


@dataclass(frozen=True)
class Series:
    name: str
    points: Sequence[tuple[datetime, float]]


def _ticks(top: float) -> list[float]:
    if top <= 0:
        return [0.0]
    return [top * i / 4 for i in range(5)]


def _y_axis(top: float, fmt: Fmt) -> str:
    """Five grid lines from 0 to `top`, each labelled on the left."""
    plot_h = H - PAD_T - PAD_B
    parts = []
    for tick in _ticks(top):
        ty = PAD_T + plot_h - (tick / top if top else 0) * plot_h
        parts.append(
            f'<line class="grid" x1="{PAD_L}" x2="{W - PAD_R}" y1="{ty:.1f}" y2="{ty:.1f}"/>'
            f'<text class="axis" x="{PAD_L - 6}" y="{ty + 4:.1f}" text-anchor="end">{escape(fmt(tick))}</text>'
        )
    return "".join(parts)


def line_chart(
    title: str,
    series: Sequence[Series],
    fmt: Fmt = compact,
    marks: Sequence[tuple[datetime, str]] = (),
) -> str:
    """Lines over time (one per series), with a y axis of 5 ticks and dated x ends;
    `marks` are moments drawn as vertical lines (e.g. incidents), each with its label."""
    xs = [t for s in series for t, _ in s.points]
    ys = [v for s in series for _, v in s.points]
    desc = f"{title}: " + "; ".join(
        f"{s.name} from {fmt(s.points[0][1])} to {fmt(s.points[-1][1])}" for s in series if s.points
    )
    out = [
        f'<svg class="chart" viewBox="0 0 {W} {H}" role="img" xmlns="http://www.w3.org/2000/svg">',
        f"<title>{escape(title)}</title><desc>{escape(desc or 'no data in this window')}</desc>",
    ]
    if not xs:
        out.append(
            f'<text x="{W / 2}" y="{H / 2}" text-anchor="middle" class="muted">no data</text>'
        )
        out.append("</svg>")
        return "".join(out)
    t0, t1 = min(xs).timestamp(), max(xs).timestamp()
    top = max(ys) or 1.0
    span = (t1 - t0) or 1.0
    plot_w, plot_h = W - PAD_L - PAD_R, H - PAD_T - PAD_B

    def x(t: datetime) -> float:
        return PAD_L + (t.timestamp() - t0) / span * plot_w

    def y(v: float) -> float:
        return PAD_T + plot_h - (v / top) * plot_h

    out.append(_y_axis(top, fmt))
    out.append(
        f'<text class="axis" x="{PAD_L}" y="{H - 8}">{min(xs):%b %d}</text>'
        f'<text class="axis" x="{W - PAD_R}" y="{H - 8}" text-anchor="end">{max(xs):%b %d}</text>'
    )
    for when, label in marks:
        if t0 <= when.timestamp() <= t1:
            out.append(
                f'<line class="mark" x1="{x(when):.1f}" x2="{x(when):.1f}" y1="{PAD_T}"'
                f' y2="{PAD_T + plot_h}"><title>{escape(label)}</title></line>'
            )
    for i, s in enumerate(series):
        if not s.points:
            continue
        path = " ".join(f"{x(t):.1f},{y(v):.1f}" for t, v in s.points)
        out.append(
            f'<polyline class="line s{i % 6}" points="{path}"><title>{escape(s.name)}</title></polyline>'
        )
    out.append("</svg>")
    return "".join(out)


def bar_chart(
    title: str,
    categories: Sequence[str],
    groups: Sequence[tuple[str, Sequence[float]]],
    fmt: Fmt = compact,
) -> str:
    """Grouped bars: for each category, one bar per group (e.g. p50/p95/p99 per provider)."""
    values = [v for _, vs in groups for v in vs]
    desc = f"{title}: " + "; ".join(
        f"{c} " + ", ".join(f"{g} {fmt(vs[i])}" for g, vs in groups)
        for i, c in enumerate(categories)
    )
    out = [
        f'<svg class="chart" viewBox="0 0 {W} {H}" role="img" xmlns="http://www.w3.org/2000/svg">',
        f"<title>{escape(title)}</title><desc>{escape(desc if categories else 'no data')}</desc>",
    ]
    if not categories or not values:
        out.append(
            f'<text x="{W / 2}" y="{H / 2}" text-anchor="middle" class="muted">no data</text></svg>'
        )
        return "".join(out)
    top = max(values) or 1.0
    plot_w, plot_h = W - PAD_L - PAD_R, H - PAD_T - PAD_B
    slot = plot_w / len(categories)
    bar = slot * 0.8 / max(1, len(groups))
    out.append(_y_axis(top, fmt))
    for i, category in enumerate(categories):
        x0 = PAD_L + i * slot + slot * 0.1
        for j, (name, vs) in enumerate(groups):
            v = vs[i]
            h = v / top * plot_h
            out.append(
                f'<rect class="bar s{j % 6}" x="{x0 + j * bar:.1f}" y="{PAD_T + plot_h - h:.1f}"'
                f' width="{bar * 0.9:.1f}" height="{h:.1f}"><title>{escape(category)} {escape(name)}:'
                f" {escape(fmt(v))}</title></rect>"
            )
        out.append(
            f'<text class="axis" x="{x0 + slot * 0.4:.1f}" y="{H - 8}" text-anchor="middle">'
            f"{escape(category)}</text>"
        )
    out.append("</svg>")
    return "".join(out)
