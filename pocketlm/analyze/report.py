"""The report of an analyze run: report.json with every number, and one self-contained report.html.

Every number is computed here from the labelled rows (nothing is written by the model): counts and
shares per label (or per value of each enum/boolean field), a cross-tab against a group column,
counts per period of a date column, a confidence histogram, the least-confident rows, and the
confusion matrix against gold. Charts are matplotlib PNGs embedded as base64, so the HTML file
needs nothing beside it."""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
import json
from collections import Counter
from pathlib import Path

from pocketlm.analyze.table import TableError, cell, write_atomic

HIST_BINS = 10
LEAST_CONFIDENT = 10


def _shares(counter: Counter, total: int) -> list[dict]:
    return [{"value": k, "count": n, "share": round(n / total, 4) if total else 0.0}
            for k, n in sorted(counter.items(), key=lambda kv: (-kv[1], str(kv[0])))]


def _period(value, where: str) -> str:
    """A date (ISO text, or a date/datetime from Parquet) -> its month, 'YYYY-MM'."""
    if isinstance(value, (dt.date, dt.datetime)):
        return value.strftime("%Y-%m")
    text = cell(value).strip()
    try:
        return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).strftime("%Y-%m")
    except ValueError:
        raise TableError(f"date_column: {where}: {text!r} is not an ISO date (expected e.g. 2024-03-01)") from None


def build_report(rows: list[dict], names: dict, fields: list[str], labels: list[str] | None, *, group_by=None,
                 date_column=None, metrics=None, text_column=None) -> dict:
    status = names["status"]
    ok = [r for r in rows if r[status] == "ok"]
    facts: dict = {"rows": len(rows), "ok": len(ok), "status": _shares(Counter(r[status] for r in rows), len(rows))}
    # the columns worth counting: the label, or each schema field whose values repeat (enums, booleans, ...)
    keys = ["label"] if labels is not None else [f for f in fields if _categorical([r[names[f]] for r in ok])]
    facts["fields"] = {k: _shares(Counter(cell(r[names[k]]) for r in ok), len(ok)) for k in keys}
    if group_by is not None:
        facts["group_by"] = {"column": group_by, "tables": {
            k: _crosstab(ok, group_by, names[k]) for k in keys}}
    if date_column is not None:
        facts["by_period"] = {"column": date_column, "period": "month", "tables": {
            k: _per_period(ok, date_column, names[k]) for k in keys}}
    if labels is not None:
        conf = [r[names["confidence"]] for r in ok]
        edges = [i / HIST_BINS for i in range(HIST_BINS + 1)]
        counts = [0] * HIST_BINS
        for c in conf:
            counts[min(int(c * HIST_BINS), HIST_BINS - 1)] += 1
        facts["confidence"] = {"bins": edges, "counts": counts, "mean": round(sum(conf) / len(conf), 4) if conf else None}
        order = sorted(range(len(rows)), key=lambda i: (rows[i][names["confidence"]] is not None,
                                                        rows[i][names["confidence"]] or 0.0))
        facts["least_confident"] = [{"row": i + 1, "label": rows[i][names["label"]],
                                     "confidence": rows[i][names["confidence"]],
                                     **({"text": cell(rows[i].get(text_column))[:200]} if text_column else {})}
                                    for i in order[:LEAST_CONFIDENT]]
    if metrics is not None:
        facts["metrics"] = metrics
    return facts


def _categorical(values) -> bool:
    """Worth counting: scalar values with at most 20 distinct ones (free text and numbers mostly are not)."""
    return bool(values) and all(not isinstance(v, (dict, list)) for v in values) and len({cell(v) for v in values}) <= 20


def _crosstab(rows, group_col, key) -> dict:
    table: dict[str, Counter] = {}
    for r in rows:
        table.setdefault(cell(r.get(group_col)), Counter())[cell(r[key])] += 1
    return {g: dict(sorted(c.items())) for g, c in sorted(table.items())}


def _per_period(rows, date_col, key) -> dict:
    table: dict[str, Counter] = {}
    for i, r in enumerate(rows):
        table.setdefault(_period(r.get(date_col), f"row {i + 1}"), Counter())[cell(r[key])] += 1
    return {p: dict(sorted(c.items())) for p, c in sorted(table.items())}


# ---- HTML ------------------------------------------------------------------------------------------------
def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return f'<img alt="chart" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def _bar(shares: list[dict], title: str) -> str:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 0.35 * len(shares) + 1))
    ax.barh([str(s["value"]) for s in shares][::-1], [s["count"] for s in shares][::-1])
    ax.set_title(title)
    ax.set_xlabel("rows")
    return _png(fig)


def _lines(table: dict, title: str) -> str:
    import matplotlib.pyplot as plt

    periods = list(table)
    values = sorted({v for c in table.values() for v in c})
    fig, ax = plt.subplots(figsize=(8, 4))
    for v in values:
        ax.plot(periods, [table[p].get(v, 0) for p in periods], marker="o", label=v)
    ax.set_title(title)
    ax.set_ylabel("rows")
    ax.legend(fontsize="small")
    fig.autofmt_xdate()
    return _png(fig)


def _hist(conf: dict) -> str:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3))
    ax.bar([b + 0.05 for b in conf["bins"][:-1]], conf["counts"], width=0.1, edgecolor="black")
    ax.set_title("confidence")
    ax.set_xlabel("confidence")
    ax.set_ylabel("rows")
    return _png(fig)


def _table(header: list, body: list[list]) -> str:
    esc = lambda v: html.escape(str(v))  # noqa: E731
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    rows = "".join("<tr>" + "".join(f"<td>{esc(v)}</td>" for v in r) + "</tr>" for r in body)
    return f"<table><tr>{head}</tr>{rows}</table>"


def _matrix(tables: dict) -> str:
    cols = sorted({c for row in tables.values() for c in row})
    return _table([""] + cols, [[k] + [row.get(c, 0) for c in cols] for k, row in tables.items()])


def _summary(summary: dict | None) -> list[str]:
    """The model's paragraph, each number not in the facts marked (analyze --summary, summary.py)."""
    if not summary:
        return []
    if summary.get("text") is None:
        return [f"<h2>summary</h2><p><em>no summary: {html.escape(str(summary.get('status')))}</em></p>"]
    from pocketlm.analyze.summary import NUMBER

    bad = set(summary["unsupported_numbers"])
    text, out, at = summary["text"], [], 0
    for m in NUMBER.finditer(text):
        out.append(html.escape(text[at:m.start()]))
        n = html.escape(m.group())
        out.append(f'<mark title="not in report.json">{n}</mark>' if m.group() in bad else n)
        at = m.end()
    out.append(html.escape(text[at:]))
    note = (f"<p><small>written by the model from report.json; {len(bad)} number(s) not found there are "
            "marked</small></p>") if bad else "<p><small>written by the model from report.json; every number " \
        "in it is one of the report's</small></p>"
    return ["<h2>summary</h2>", f"<p>{''.join(out)}</p>", note]


def render_html(facts: dict) -> str:
    import matplotlib

    matplotlib.use("Agg")
    parts = [f"<h1>analyze report</h1><p>{facts['rows']} rows, {facts['ok']} answered within the constraint.</p>",
             *_summary(facts.get("summary")),
             "<h2>status</h2>", _table(["status", "rows", "share"], [[s["value"], s["count"], s["share"]]
                                                                     for s in facts["status"]])]
    for key, shares in facts["fields"].items():
        parts += [f"<h2>{html.escape(key)}</h2>", _bar(shares, key),
                  _table([key, "rows", "share"], [[s["value"], s["count"], s["share"]] for s in shares])]
    if "group_by" in facts:
        for key, t in facts["group_by"]["tables"].items():
            parts += [f"<h2>{html.escape(key)} by {html.escape(facts['group_by']['column'])}</h2>", _matrix(t)]
    if "by_period" in facts:
        for key, t in facts["by_period"]["tables"].items():
            parts += [f"<h2>{html.escape(key)} per month</h2>", _lines(t, f"{key} per month"), _matrix(t)]
    if "confidence" in facts:
        parts += ["<h2>confidence</h2>", _hist(facts["confidence"]), "<h3>least confident rows</h3>",
                  _table(list(facts["least_confident"][0]) if facts["least_confident"] else [],
                         [list(r.values()) for r in facts["least_confident"]])]
    if "metrics" in facts:
        m = facts["metrics"]
        parts += ["<h2>against gold</h2>", f"<p>accuracy {m['accuracy']:.4f}, macro-F1 {m['macro_f1']:.4f} "
                  f"over {m['n']} rows</p>", "<h3>confusion (rows: gold, columns: predicted)</h3>",
                  _matrix(m["confusion"])]
    style = ("body{font-family:sans-serif;max-width:60em;margin:2em auto}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}img{max-width:100%}"
             "table{display:block;overflow-x:auto;max-width:100%}mark{background:#fd8}")  # wide cross-tabs scroll
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>analyze report</title><style>{style}</style>"
            f"</head><body>{''.join(parts)}</body></html>\n")


def write_report(facts: dict, path) -> dict:
    """report.html at `path` and report.json beside it; returns both paths."""
    path = Path(path)
    json_path = path.with_suffix(".json")
    write_atomic(json_path, json.dumps(facts, indent=2, ensure_ascii=False) + "\n")
    write_atomic(path, render_html(facts))
    return {"html": str(path), "json": str(json_path)}
