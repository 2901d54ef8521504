#!/usr/bin/env python3
"""Render a PNG preview of the main panels of the qgaproxy Grafana dashboard.

It reads the panels' PromQL from deploy/grafana/qgaproxy.json (so the
preview shows what the dashboard shows), runs each through a real
Prometheus's /api/v1/query_range, and draws them with matplotlib:

    python3 scripts/render_dashboard_preview.py --prometheus http://127.0.0.1:9090 \\
        --agent vm1 --last 15m -o docs/dashboard-preview.png

`tests/test_prometheus.py` runs it against the Prometheus it starts; set
QGAPROXY_PREVIEW_OUT=docs/dashboard-preview.png (and QGAPROXY_PREVIEW_SECONDS
for a longer run) to regenerate the committed preview from real traffic.
Only the standard library and matplotlib are needed.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import re
import sys
import time
import urllib.parse
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DASHBOARD = os.path.join(ROOT, "deploy", "grafana", "qgaproxy.json")

# (panel title in the dashboard, refIds drawn from it (None: all), title shown).
PANELS = (
    ("Agent up", None, "Agent up"),
    ("Request rate by command", None, "Request rate by command"),
    ("Latency p50 / p99 by command", ("B",), "Latency p99 by command"),
    ("Clients connected by listener", None, "Clients connected by listener"),
    ("Guest filesystem used", None, "Guest filesystem used"),
    ("Timeouts and resyncs", None, "Timeouts and resyncs"),
)

_BG = "#111217"
_PANEL = "#181b1f"
_GRID = "#2c3235"
_TEXT = "#ccccdc"
_COLORS = ("#73bf69", "#f2cc0c", "#8ab8ff", "#ff780a", "#f2495c", "#5794f2", "#b877d9", "#705da0",
           "#37872d", "#fade2a", "#447ebc", "#c15c17", "#890f02", "#0a437c", "#6d1f62", "#584477")


def load_dashboard(path: str = DASHBOARD) -> dict:
    with open(path) as f:
        return json.load(f)


def iter_panels(dashboard: dict):
    """Every panel, rows' nested panels included."""
    for panel in dashboard.get("panels", ()):
        yield panel
        yield from panel.get("panels", ())


def substitute(expr: str, agent: str, rate_interval: str = "5s", range_: str = "5m") -> str:
    """The expression as Grafana would send it, for one agent."""
    out = expr.replace("${agent}", agent).replace("$agent", agent)
    out = out.replace("$__rate_interval", rate_interval).replace("$__interval", rate_interval)
    return out.replace("$__range", range_)


def legend(fmt: str, metric: dict) -> str:
    if not fmt:
        return ", ".join("%s=%s" % kv for kv in sorted(metric.items())) or "value"
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: metric.get(m.group(1), ""), fmt).strip()


def query_range(base: str, expr: str, start: float, end: float, step: float, timeout: float = 30.0) -> list:
    params = urllib.parse.urlencode({"query": expr, "start": "%.3f" % start, "end": "%.3f" % end, "step": "%g" % step})
    with urllib.request.urlopen(base.rstrip("/") + "/api/v1/query_range?" + params, timeout=timeout) as reply:
        body = json.load(reply)
    if body.get("status") != "success":
        raise RuntimeError("query_range %r failed: %s" % (expr, body))
    return body["data"]["result"]


def _scale(unit: str, peak: float) -> tuple[float, str]:
    """A divisor and a y-axis label for a Grafana unit."""
    if unit == "bytes" or unit == "Bps":
        suffix = "/s" if unit == "Bps" else ""
        for div, name in ((1 << 40, "TiB"), (1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
            if peak >= div:
                return div, name + suffix
        return 1, "B" + suffix
    if unit == "s":
        if 0 < peak < 1e-3:
            return 1e-6, "µs"
        if 0 < peak < 1:
            return 1e-3, "ms"
        return 1, "s"
    return 1, {"reqps": "req/s", "ops": "per second", "short": ""}.get(unit, unit)


def render(base: str, agent: str, start: float, end: float, out: str, *, step: float | None = None,
           rate_interval: str = "5s", dashboard_path: str = DASHBOARD, panels=PANELS, title: str | None = None) -> dict:
    """Query Prometheus and write the PNG; returns {panel title: number of series drawn}.
    panels: (dashboard panel title, refIds to draw or None for all, title shown)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    dashboard = load_dashboard(dashboard_path)
    by_title = {p.get("title"): p for p in iter_panels(dashboard)}
    if step is None:
        step = max(1.0, math.ceil((end - start) / 300))
    cols = 3
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.2 * cols, 3.6 * rows + 0.7), squeeze=False)
    fig.patch.set_facecolor(_BG)
    drawn: dict[str, int] = {}
    for i, (name, refs, shown) in enumerate(panels):
        ax = axes[i // cols][i % cols]
        panel = by_title.get(name)
        if panel is None:
            raise KeyError("no panel %r in %s" % (name, dashboard_path))
        unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "short")
        series = []
        for t in panel.get("targets", ()):
            if refs is not None and t.get("refId") not in refs:
                continue
            for s in query_range(base, substitute(t["expr"], agent, rate_interval), start, end, step):
                points = [(float(ts), float(v)) for ts, v in s["values"]]
                points = [(ts, v) for ts, v in points if not math.isnan(v) and not math.isinf(v)]
                if points:
                    series.append((legend(t.get("legendFormat", ""), s["metric"]), points))
        peak = max((abs(v) for _, pts in series for _, v in pts), default=0.0)
        div, ylabel = _scale(unit, peak)
        _style(ax, shown)
        stepped = panel.get("type") == "state-timeline"
        for k, (label, points) in enumerate(sorted(series)):
            xs = [_dt.datetime.fromtimestamp(ts) for ts, _ in points]
            ys = [v / div for _, v in points]
            color = _COLORS[k % len(_COLORS)]
            if stepped:
                ax.step(xs, ys, where="post", color=color, linewidth=1.6, label=label)
                ax.fill_between(xs, ys, step="post", color=color, alpha=0.15)
            else:
                ax.plot(xs, ys, color=color, linewidth=1.3, label=label)
        if stepped:
            ax.set_ylim(-0.1, 1.2)
            ax.set_yticks([0, 1])
            ax.set_yticklabels(["down", "up"])
        else:
            ax.set_ylim(bottom=0)
            ax.set_ylabel(ylabel, color=_TEXT, fontsize=8)
        if series:
            ax.legend(loc="upper left", fontsize=6.5, frameon=False, labelcolor=_TEXT, ncol=2 if len(series) > 4 else 1)
        else:
            ax.text(0.5, 0.5, "No data", color=_TEXT, ha="center", va="center", transform=ax.transAxes)
        ax.set_xlim(_dt.datetime.fromtimestamp(start), _dt.datetime.fromtimestamp(end))
        ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S"))
        drawn[name] = len(series)
    for j in range(len(panels), rows * cols):
        axes[j // cols][j % cols].set_visible(False)
    heading = title or "qgaproxy - agent %s - %s to %s" % (
        agent,
        time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(start)),
        time.strftime("%H:%M:%S", time.localtime(end)),
    )
    fig.suptitle(heading, color=_TEXT, fontsize=12, x=0.01, ha="left")
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=100, facecolor=_BG)
    plt.close(fig)
    return drawn


def _style(ax, title: str) -> None:
    ax.set_facecolor(_PANEL)
    ax.set_title(title, color=_TEXT, fontsize=10, loc="left")
    ax.grid(True, color=_GRID, linewidth=0.6)
    ax.tick_params(colors=_TEXT, labelsize=7)
    for spine in ax.spines.values():
        spine.set_color(_GRID)


def _duration(text: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd]?)", text)
    if not m:
        raise argparse.ArgumentTypeError("expected a duration such as 90s, 15m or 1h, got %r" % text)
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prometheus", default="http://127.0.0.1:9090", metavar="URL")
    parser.add_argument("--agent", default="default", help="the value of the dashboard's $agent variable")
    parser.add_argument("--last", type=_duration, default=_duration("15m"), metavar="DURATION",
                        help="render the last DURATION (default 15m), unless --start/--end are given")
    parser.add_argument("--start", type=float, metavar="UNIXTIME")
    parser.add_argument("--end", type=float, metavar="UNIXTIME")
    parser.add_argument("--step", type=float, metavar="SECONDS", help="query_range step (default: about 300 points)")
    parser.add_argument("--rate-interval", default="5s", help="what $__rate_interval stands for (default 5s)")
    parser.add_argument("--dashboard", default=DASHBOARD, metavar="JSON")
    parser.add_argument("--title")
    parser.add_argument("-o", "--output", default=os.path.join(ROOT, "docs", "dashboard-preview.png"), metavar="PNG")
    args = parser.parse_args(argv)
    end = args.end if args.end is not None else time.time()
    start = args.start if args.start is not None else end - args.last
    drawn = render(args.prometheus, args.agent, start, end, args.output, step=args.step,
                   rate_interval=args.rate_interval, dashboard_path=args.dashboard, title=args.title)
    for name, count in drawn.items():
        print("%-32s %d series" % (name, count))
    print("wrote", args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
