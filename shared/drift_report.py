"""The drift report: one self-contained HTML file per check, charts rendered with matplotlib and embedded as PNG data URIs."""

from __future__ import annotations

import base64
import html
import io
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from shared.profiles import PREDICTION, model_profile

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from shared.drift import DriftThresholds, VersionWindow

TOP_DRIFTED = 3

_STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #1d232a; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-top: 1px solid #ccd; padding-top: 1em; }
table { border-collapse: collapse; margin: .5em 0 1em; } td, th { padding: .2em .7em; border-bottom: 1px solid #e3e6ea; text-align: left; }
.alert { color: #b3261e; font-weight: 600; } .warning { color: #9a6700; font-weight: 600; } .ok { color: #1a7f37; }
.muted { color: #57606a; } img { max-width: 100%; } .charts { display: flex; flex-wrap: wrap; gap: 1em; }
"""


def _png(figure: Figure) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(figure)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _img(uri: str, alt: str) -> str:
    return f'<img src="{uri}" alt="{html.escape(alt)}">'


def _psi_bars(entry: dict[str, Any], thresholds: DriftThresholds) -> str:
    import matplotlib.pyplot as plt

    features = sorted(entry["features"], key=lambda f: f["psi"])
    figure, axis = plt.subplots(figsize=(7.5, 0.22 * len(features) + 1.2))
    colors = [
        "#b3261e" if f["psi"] >= thresholds.psi_alert else "#d4a72c" if f["psi"] >= thresholds.psi_warn else "#4c72b0"
        for f in features
    ]
    axis.barh([f["feature"] for f in features], [f["psi"] for f in features], color=colors)
    axis.axvline(thresholds.psi_warn, color="#d4a72c", linestyle="--", label=f"warn {thresholds.psi_warn:g}")
    axis.axvline(thresholds.psi_alert, color="#b3261e", linestyle="--", label=f"alert {thresholds.psi_alert:g}")
    axis.set_xlabel("PSI against the held-out reference (deciles)")
    axis.tick_params(axis="y", labelsize=7)
    axis.legend(loc="lower right", fontsize=8)
    return _img(_png(figure), f"PSI per feature of {entry['skill']} {entry['model_version']}")


def _histogram(window: VersionWindow, name: str, title: str) -> str:
    import matplotlib.pyplot as plt

    reference = model_profile(window.model).reference(name)
    groups = int(reference.groups.max()) + 1
    expected = np.bincount(reference.groups, weights=reference.counts, minlength=groups)
    current = window.counts.get(name, np.zeros(len(reference.counts)))
    actual = np.bincount(reference.groups, weights=np.asarray(current, dtype=np.float64), minlength=groups)
    edges = reference.edges[np.r_[np.searchsorted(reference.groups, np.arange(groups)), len(reference.groups)]]
    labels = [f"{edges[i]:.3g}" for i in range(groups)]
    figure, axis = plt.subplots(figsize=(5.2, 2.6))
    positions = np.arange(groups)
    axis.bar(positions - 0.2, expected / max(expected.sum(), 1), width=0.4, label="reference (held-out)", color="#8c8c8c")
    axis.bar(positions + 0.2, actual / max(actual.sum(), 1), width=0.4, label="window", color="#4c72b0")
    axis.set_xticks(positions, labels, rotation=45, fontsize=7)
    axis.set_ylabel("share")
    axis.set_title(title, fontsize=9)
    axis.legend(fontsize=7)
    return _img(_png(figure), title)


def _scatter(window: VersionWindow, correlation: dict[str, Any]) -> str:
    import matplotlib.pyplot as plt

    assert window.pairs is not None
    scores, ratings = window.pairs
    jitter = np.random.default_rng(0).uniform(-0.12, 0.12, len(ratings))
    figure, axis = plt.subplots(figsize=(5.2, 3.0))
    axis.scatter(ratings + jitter, scores, s=6, alpha=0.4, color="#4c72b0")
    axis.set_xlabel("teacher rating (1-5, jittered)")
    axis.set_ylabel("score")
    axis.set_title(
        f"scores vs teacher ratings: Pearson r = {correlation['pearson']:.2f} "
        f"(95% CI {correlation['ci95'][0]:.2f}..{correlation['ci95'][1]:.2f}), n = {correlation['n']}",
        fontsize=8,
    )
    return _img(_png(figure), "scores against teacher ratings")


_ALERT_LABELS = {"prediction_psi": "PSI of the prediction", "teacher_correlation": "Pearson r with teachers"}


def _alert_text(alert: dict[str, Any]) -> str:
    what = f"PSI of {alert['feature']}" if "feature" in alert else _ALERT_LABELS.get(alert["kind"], alert["kind"])
    return (
        f'<li class="{alert["severity"]}">{html.escape(alert["severity"])}: {html.escape(what)} '
        f"= {alert['value']:.3f} (threshold {alert['threshold']:g})</li>"
    )


def _section(window: VersionWindow, thresholds: DriftThresholds) -> str:
    entry = window.result
    title = f"{entry['skill']} {entry['model_version']} ({entry['stage']})"
    parts = [f"<h2>{html.escape(title)}</h2>", f"<p>{entry['students']:,} students scored in the window.</p>"]
    if entry["status"] == "insufficient_data":
        parts.append(
            f'<p class="muted">Insufficient data: fewer than {thresholds.min_students} students scored; '
            "no drift statistic is computed and nothing is alerted.</p>"
        )
    else:
        parts.append(
            "<table><tr><th>variable</th><th>PSI (deciles; warn / alert)</th><th>KS statistic</th><th>KS p-value</th></tr>"
            f"<tr><td>prediction</td><td>{entry['psi_prediction']:.3f} ({thresholds.psi_warn:g} / {thresholds.psi_alert:g})</td>"
            f"<td>{entry['ks_prediction']:.3f}</td><td>{entry['ks_prediction_pvalue']:.3g}</td></tr></table>"
        )
    alerts = entry["alerts"]
    parts.append("<ul>" + "".join(_alert_text(a) for a in alerts) + "</ul>" if alerts else '<p class="ok">No alert.</p>')
    charts: list[str] = []
    if entry["status"] != "insufficient_data":
        charts.append(_psi_bars(entry, thresholds))
        charts.append(_histogram(window, PREDICTION, "prediction: reference vs window"))
        drifted = sorted(entry["features"], key=lambda f: -f["psi"])[:TOP_DRIFTED]
        charts += [_histogram(window, f["feature"], f"{f['feature']} (PSI {f['psi']:.3f})") for f in drifted]
    correlation = entry["teacher_correlation"]
    if correlation is not None:
        charts.append(_scatter(window, correlation))
        parts.append(
            f"<p>Teacher agreement: Pearson r {correlation['pearson']:.3f}, Spearman rho {correlation['spearman']:.3f}, "
            f"n {correlation['n']}; alert below r = {thresholds.min_teacher_r:g}.</p>"
        )
    else:
        parts.append(f'<p class="muted">Teacher agreement: fewer than {thresholds.min_rated} rated students were scored in the window.</p>')
    parts.append('<div class="charts">' + "".join(charts) + "</div>")
    return "\n".join(parts)


def render_report(check: dict[str, Any], windows: Sequence[VersionWindow], thresholds: DriftThresholds) -> bytes:
    """Returns the check's report as one HTML document that fetches nothing."""
    import matplotlib

    matplotlib.use("Agg")  # no display: render to memory only
    window = check["window"]
    counts = {
        severity: sum(1 for w in windows for a in w.result["alerts"] if a["severity"] == severity)
        for severity in ("alert", "warning")
    }
    head = (
        f"<h1>Drift check {html.escape(check['check_id'])}</h1>"
        f"<p>Window {html.escape(window['from'])} to {html.escape(window['to'])} ({window['days']} days), "
        f"created {html.escape(check['created_at'])}. {counts['alert']} alerts, {counts['warning']} warnings.</p>"
        "<p class=\"muted\">Methods: PSI over the held-out deciles of each variable; two-sample Kolmogorov-Smirnov "
        "over the 100 held-out quantile bins (statistic and asymptotic p-value, reported, not alerted); "
        "Pearson and Spearman correlation of scores with teacher ratings, with a Fisher-z 95% interval.</p>"
    )
    body = "\n".join(_section(w, thresholds) for w in windows)
    document = (
        f"<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>Drift check {html.escape(check['check_id'])}</title>"
        f"<style>{_STYLE}</style></head><body>{head}{body}</body></html>"
    )
    return document.encode("utf-8")
