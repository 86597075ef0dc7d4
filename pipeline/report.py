"""The human report written next to manifest.json: report.md, and report.html rendered from the same lines
(self-contained: inline CSS and SVG charts, no script, no external asset, opens offline)."""
from __future__ import annotations

import html
import logging
import re
from pathlib import Path

from edgebuild.pipeline.results import Latency, Manifest, Memory, Metrics, ObjectiveDecision, Ratios, TargetResult

log = logging.getLogger("edgebuild.report")


def _fmt(v, spec=".2f", suffix=""):
    return "–" if v is None else f"{v:{spec}}{suffix}"


def _quality(m: Metrics | None) -> str:
    """The headline quality of a target: accuracy, top-1 agreement, the task's first score, or the worst cosine."""
    if m is None:
        return "–"
    if m.accuracy is not None:
        return _fmt(m.accuracy, suffix=" %")
    if m.top1_agreement is not None:
        return _fmt(m.top1_agreement, suffix=" % agree")
    first = m.task.first() if m.task else None
    if first:
        return f"{first[0]} {first[1]:.4g}"
    return _fmt(m.cosine_min, ".4f", " cos")


def summary_rows(manifest: Manifest | dict) -> list[dict]:
    """One row per target: the build summary table (report.md and the CLI)."""
    rows = []
    for name, t in Manifest.of(manifest).targets.items():
        m, lat, r = t.metrics, t.latency or Latency(), t.ratios or Ratios()
        rows.append({
            "target": name, "verdict": t.verdict.status.upper(), "artifact": (t.artifact or "–") + _int8_share(t),
            "accuracy": _quality(m),
            "drop": _fmt(m.accuracy_drop, "+.2f", " pt") if m is not None and m.accuracy_drop is not None else "–",
            "p50": _fmt(lat.p50_ms, ".3f", " ms"),
            "size": _fmt(t.size_bytes / 1e6 if t.size_bytes else None, ".3f", " MB"),
            "size_ratio": _fmt(r.size_vs_fp32, ".3f", "×"),
            "speedup": _fmt(r.speedup_vs_fp32, ".2f", "×"),
            "memory": _memory(t.memory or Memory()),
        })
    return rows


def _int8_share(t: TargetResult) -> str:
    """The share of the weights in INT8 layers (pipeline/stages/weights.py), when measured: ``_int8`` means >= 90 %;
    with weight-only INT8 (a float layer's weights stored int8), the share stored in 8 bits too."""
    share = t.quantized.int8_weight_share if t.quantized else None
    if share is None:
        return ""
    stored = t.quantized.stored_int8_share if t.quantized.weight_only_weights else None
    return f" ({share:.0%} INT8 weights" + (f", {stored:.0%} stored in 8 bits)" if stored is not None else ")")


def _memory(mem: Memory) -> str:
    """Peak runtime memory above the runner's baseline; on a microcontroller, TFLM's arena too."""
    text = _fmt(mem.peak_mb, ".1f", " MB")
    arena = (mem.micro or {}).get("arena_kb")
    return text + (f" (arena {arena:.1f} KB)" if arena is not None else "")


def memory_lines(t: TargetResult) -> list[str]:
    """How much memory the runtime needed (pipeline/memory.py), and a microcontroller's fit (targets/tflite/tflm.py)."""
    mem = t.memory or Memory()
    base = (t.baseline_fp32.memory if t.baseline_fp32 else None) or Memory()
    lines = []
    if mem.peak_mb is not None:
        fp32 = f"; FP32 {base.peak_mb:.2f} MB" if base.peak_mb is not None else ""
        lines.append(f"- runtime memory: peak {mem.peak_mb:.2f} MB above the runner's baseline "
                     f"(after loading {mem.load_mb:.2f} MB){fp32}; {mem.method or ''}")
    micro = mem.micro
    if micro:
        agree = "; ".join(f"{n}: " + ", ".join(f"{k} {v}" for k, v in o.items())
                          for n, o in micro["agreement_with_litert"]["outputs"].items())
        lines.append(f"- microcontroller ({micro['runtime']}): tensor arena {micro['arena_kb']:.2f} KB, "
                     f"flash {micro['flash_kb']:.2f} KB (model only, not TFLM's code); TFLM vs LiteRT on "
                     f"{micro['agreement_with_litert']['samples']} samples: {agree}")
    return lines


def write_report(manifest: Manifest | dict, path: Path) -> None:
    """report.md and report.html (the same lines, with charts) for a build."""
    from edgebuild.pipeline import plots

    manifest = Manifest.of(manifest)
    raw = manifest.to_dict()  # the charts read manifest.json's keys
    lines = _header_lines(manifest)
    charts = {len(lines): plots.tradeoff(raw) + plots.versus_fp32(raw)}  # line index -> HTML before it
    if not plots.available():
        log.warning("report.html without charts: %s", plots.MISSING_NOTE)
        charts[len(lines)] = f'<p class="warning">{html.escape(plots.MISSING_NOTE)}</p>'
    if manifest.compression:
        from edgebuild.pipeline.stages.compress import markdown

        lines += ["", *markdown(manifest.compression)]
    for name, t in manifest.targets.items():
        lines += _target_lines(name, t, charts, len(lines))
    path.write_text("\n".join(lines) + "\n")
    path.with_suffix(".html").write_text(to_html(lines, manifest, charts))


def _header_lines(manifest: Manifest) -> list[str]:
    model, data = manifest.model, manifest.data
    lines = [
        f"# edgebuild report — {manifest.verdict.status.upper()}", "",
        f"- model: {model['source']} (exporter: {model.get('exporter')}, opset {model.get('opset')})",
        f"- FP32 reference accuracy: {_fmt(model.get('accuracy'), suffix=' %')}",
        f"- calibration: {data['calibration']['samples']} samples from {data['calibration']['name']}; "
        f"evaluation: {data['evaluation']['samples']} samples from {data['evaluation']['name']} (disjoint)",
        f"- built in {manifest.seconds} s with edgebuild {manifest.edgebuild}",
        *_class_names_lines(manifest),
        *_judging_lines(manifest.judging or {}),
        *[f"- **warning:** {w}" for w in slower_than_fp32(manifest)], "",
        "| target | verdict | artifact | accuracy | drop vs FP32 | p50 latency | size | size vs FP32 | speed vs FP32 | memory |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary_rows(manifest):
        lines.append(f"| {r['target']} | {r['verdict']} | {r['artifact']} | {r['accuracy']} | {r['drop']} | {r['p50']} | "
                     f"{r['size']} | {r['size_ratio']} | {r['speedup']} | {r['memory']} |")
    return lines


def _target_lines(name: str, t: TargetResult, charts: dict[int, str], at: int) -> list[str]:
    """A target's section; its charts go into ``charts`` by line index (the section starts at line ``at``)."""
    from edgebuild.pipeline import plots

    lines = ["", f"## {name}", "", t.profile["description"].strip(), ""]
    alt = t.extra.get("alternatives")
    if isinstance(alt, dict) and alt.get("shipped") and alt["shipped"] != name:
        lines += [f"Shipped by profile **{alt['shipped']}** ({alt.get('backend')}), an alternative of {name} "
                  f"({alt.get('mode')}): {alt.get('why')}", ""]
    if t.verdict.status == "error":
        return lines + [f"**Conversion failed:** {t.verdict.error}"]
    if t.verdict.failures:
        lines += ["**Budget failures:**", *[f"- {f}" for f in t.verdict.failures], ""]
    metrics = t.metrics.to_dict() if t.metrics else {}
    charts[at + len(lines)] = charts.get(at + len(lines), "") + plots.outputs(name, metrics)
    lines += _output_table(t.metrics)
    lines += ["", "Settings:", "", "| setting | value |", "|---|---|"]
    lines += [f"| {k} | {_cell(v)} |" for k, v in settings_rows(t.settings or {})]
    lines.append("")
    if t.host_validation:
        lines.append(f"- host validation: {t.host_validation}")
    lines += memory_lines(t)
    lines += [f"- note: {note}" for note in t.notes or []]
    if t.search:
        search = t.search.to_dict()  # the tries as manifest.json has them (their headline key varies)
        charts[at + len(lines)] = charts.get(at + len(lines), "") + plots.search(name, search) + plots.sensitivity(
            name, (t.search.sensitivity or {}).get("layers") or {})
        lines += _search_lines(search)
    return lines


def _search_lines(search: dict) -> list[str]:
    lines = ["", "Accuracy search (every configuration tried):", "",
             "| # | configuration | quality | size | p50 | result |", "|---|---|---|---|---|---|"]
    for i, a in enumerate(search.get("tries", []), 1):
        q = next((f"{k} {v:.4g}" for k, v in a.items() if isinstance(v, float) and k not in
                  ("latency_p50_ms", "quality_loss")), "–")
        result = f"error: {a['error']}" if a.get("error") else "; ".join(a.get("failures") or []) or "ok"
        size = _fmt(a["size_bytes"] / 1e6 if a.get("size_bytes") else None, ".3f", " MB")
        lines.append(f"| {i} | {a.get('label', '')} | {q} | {size} | "
                     f"{_fmt(a.get('latency_p50_ms'), '.3f', ' ms')} | {_cell(result)} |")
    if search.get("float_layers"):
        lines += ["", "Layers kept in float (sensitivity = quality lost when only this layer is quantized):", ""]
        lines += [f"- `{n}`: {s:.2f}" for n, s in search["float_layers"].items()]
    sens = search.get("sensitivity") or {}
    if sens.get("layers"):
        lines += ["", f"Per-layer INT8 sensitivity, most sensitive first ({sens.get('method', '')}; "
                  f"{sens.get('seconds', '–')} s):", "", "| layer | quality loss |", "|---|---|"]
        lines += [f"| `{n}` | {v:.4g} |" for n, v in sens["layers"].items()]
    return lines


def slower_than_fp32(manifest: Manifest | dict) -> list[str]:
    """A quantized artifact that runs slower than the FP32 one on the host: passing budgets, but worth a word."""
    out = []
    for name, t in Manifest.of(manifest).targets.items():
        obj = t.objective or ObjectiveDecision()
        if obj.applied:  # what shipped, and why
            out.append(f"{name}: objective {obj.objective}: shipped {obj.shipped} ({obj.why})")
        out += [f"{name}: advice: {w}" for w in obj.advice or []]  # a profile's typical device limits, not budgets
        speedup = t.ratios.speedup_vs_fp32 if t.ratios else None
        if t.verdict.status == "error" or t.precision == "fp32" or speedup is None or speedup >= 1.0:
            continue
        base = t.baseline_fp32.latency.p50_ms if t.baseline_fp32 and t.baseline_fp32.latency else None
        vs = f"p50 {t.latency.p50_ms:.3f} ms vs {base:.3f} ms" if base and t.latency else f"{speedup:.2f}×"
        out.append(f"{name}: the {str(t.precision or 'quantized').upper()} artifact is slower than FP32 on this "
                   f"host ({speedup:.2f}× speed, {vs}); check the runtime's kernels for it on the device")
    return out


def settings_rows(settings: dict, prefix: str = "") -> list[tuple[str, object]]:
    """A settings dict as (dotted key, value) rows: nested mappings flattened, lists kept as values."""
    rows = []
    for k, v in settings.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            rows += settings_rows(v, key + ".")
        else:
            rows.append((key, v))
    return rows


def _cell(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (list, tuple)):
        return ", ".join(_cell(x) for x in v) if v else "none"
    if isinstance(v, dict):
        return "none"
    return str(v).replace("|", "\\|").replace("\n", " ")


# ---- HTML ---------------------------------------------------------------------------------------------------

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1100px;color:#1b1f24;padding:0 1rem}
h1{font-size:1.6rem}h2{font-size:1.25rem;margin-top:2rem;border-bottom:1px solid #d0d7de;padding-bottom:.2rem}
table{border-collapse:collapse;margin:.6rem 0;font-size:13px}th,td{border:1px solid #d0d7de;padding:.25rem .5rem;text-align:left;vertical-align:top}
th{background:#f6f8fa}tr.pass td:nth-child(2){color:#1a7f37;font-weight:600}tr.fail td:nth-child(2),tr.error td:nth-child(2){color:#cf222e;font-weight:600}
code{background:#f6f8fa;padding:0 .25rem;border-radius:3px;font-size:12px}.warning{color:#9a6700}
.charts{display:flex;flex-wrap:wrap;gap:1.5rem}.charts figure{margin:0}figcaption{font-weight:600;margin-bottom:.3rem}
"""


def _inline(text: str) -> str:
    text = html.escape(text, quote=False)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", text)


def _row_cells(line: str) -> list[str]:
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip()[1:-1])]


def to_html(lines: list[str], manifest: Manifest, charts: dict[int, str]) -> str:
    """The report's Markdown lines as one self-contained HTML page; ``charts[i]`` (inline SVG, pipeline/plots.py)
    goes before line ``i`` (or at the end)."""
    body, i = [], 0
    while i < len(lines):
        if charts.get(i):
            body.append('<div class="charts">' + charts[i] + "</div>")
        line = lines[i]
        if line.startswith("|") and i + 1 < len(lines) and set(lines[i + 1].replace("|", "")) <= set("-: ") and lines[i + 1].startswith("|"):
            head = _row_cells(line)
            rows, i = [], i + 2
            while i < len(lines) and lines[i].startswith("|"):
                rows.append(_row_cells(lines[i]))
                i += 1
            body.append(_html_table(head, rows))
            continue
        if line.startswith("- "):
            items = []
            while i < len(lines) and lines[i].startswith("- "):
                cls = ' class="warning"' if lines[i].startswith("- **warning:**") else ""
                items.append(f"<li{cls}>{_inline(lines[i][2:])}</li>")
                i += 1
            body.append("<ul>" + "".join(items) + "</ul>")
            continue
        m = re.match(r"(#{1,3}) (.*)", line)
        if m:
            n = len(m[1])
            body.append(f"<h{n}>{_inline(m[2])}</h{n}>")
        elif line.strip():
            body.append(f"<p>{_inline(line)}</p>")
        i += 1
    body += ['<div class="charts">' + c + "</div>" for k, c in charts.items() if k >= len(lines) and c]
    return html_page(f"edgebuild report — {manifest.verdict.status.upper()}", "\n".join(body))


def html_page(title: str, body: str) -> str:
    """A self-contained page in the report's style around ``body`` (HTML)."""
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{CSS}</style></head>'
            f'<body>\n' + body + "\n</body></html>\n")


def _html_table(head: list[str], rows: list[list[str]]) -> str:
    verdict_col = head.index("verdict") if "verdict" in head else None
    out = ["<table><thead><tr>" + "".join(f"<th>{_inline(h)}</th>" for h in head) + "</tr></thead><tbody>"]
    for r in rows:
        cls = f' class="{html.escape(r[verdict_col].lower())}"' if verdict_col is not None and verdict_col < len(r) else ""
        out.append(f"<tr{cls}>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>")
    return "".join(out) + "</tbody></table>"


def _class_names_lines(manifest: Manifest) -> list[str]:
    names = (manifest.data or {}).get("class_names")
    if not names:
        return []
    shown = ", ".join(f"{i}: {n}" for i, n in enumerate(names[:20])) + (f", … ({len(names)} in all)" if len(names) > 20 else "")
    return [f"- class names (embedded in the artifacts): {shown}"]


def _judging_lines(j: dict) -> list[str]:
    lines = []
    if j:
        what = f"task {j.get('task', 'auto')}" + (f", evaluator `{j['evaluator']}`" if j.get("evaluator") else "")
        lines.append(f"- judged per output ({', '.join(j.get('outputs', []))}): {what}; labels score "
                     f"{'output ' + j['labels_output'] if j.get('labels_output') else 'no output'}")
    loop = (j or {}).get("stateful")
    if loop and loop.get("closed_loop"):
        mapping = ", ".join(f"{o} -> {i}" for o, i in loop["state"].items())
        lines.append(f"- stateful model, judged **closed loop**: state {mapping} ({loop['how']}); the FP32 reference and "
                     f"every artifact fed back their own state over {loop['sequences']} sequence(s), {loop['steps']} "
                     f"steps (longest {loop['longest']}); a sequence's first step takes {loop['first_step']}")
    lines += [f"- **warning:** {w}" for w in j.get("warnings", [])]
    return lines


def _output_table(m: Metrics | None) -> list[str]:
    """Each output's own metrics, and the task's scores next to the FP32 reference's."""
    if m is None or not m.outputs:
        return []
    lines = ["| output | kind | cosine | SQNR | max abs error | top-1 agree | accuracy (FP32) | worst channel group |",
             "|---|---|---|---|---|---|---|---|"]
    for name, o in m.outputs.items():
        worst = o.worst_group()
        group = f"{worst['slices']} (axis {worst['axis']}): cos {worst['cosine']:.4f}" if worst else "–"
        acc = f"{o.accuracy:.2f} % ({o.accuracy_reference:.2f} %)" if o.accuracy is not None else "–"
        lines.append(f"| {name} | {o.kind} | {_fmt(o.cosine, '.4f')} | {_fmt(o.sqnr_db, '.1f', ' dB')} | "
                     f"{_fmt(o.max_abs_error, '.3g')} | {_fmt(o.top1_agreement, '.2f', ' %')} | {acc} | {group} |")
    task = m.task
    if task:
        lines += ["", f"Task scores ({task.name}):", "", "| score | FP32 | artifact |", "|---|---|---|"]
        lines += [f"| {k} | {task.reference.get(k, float('nan')):.4g} | {v:.4g} |" for k, v in task.artifact.items()]
        lines += _near_tie_note(task.artifact)
    return ["", *lines, ""]


def _near_tie_note(scores: dict) -> list[str]:
    """What the near-tie rule (pipeline/metrics.py NEAR_TIE_RATIO) changed in a task score, when it did."""
    seq, seq_exact = scores.get("sequence_agreement"), scores.get("sequence_agreement_exact")
    if seq is not None and seq_exact is not None and seq > seq_exact:
        return ["", f"{seq - seq_exact:.3g} % of the strings differ from FP32's only at near-tie frames (FP32's own "
                "top two classes within `near_tie_ratio`): they count as agreeing; `sequence_agreement_exact` counts "
                "them as not"]
    f1, f1_exact = scores.get("f1"), scores.get("f1_exact")
    if f1 is not None and f1_exact is not None and f1 > f1_exact:
        return ["", f"f1 {f1:.4g} counts the boxes one side scores just above the threshold and the other just below "
                f"(within `near_tie_ratio` of it: FP32 itself on the fence) as found; `f1_exact` {f1_exact:.4g} "
                "counts them as missed"]
    return []
