"""The human report (Markdown) written next to manifest.json."""
from __future__ import annotations

from pathlib import Path


def _fmt(v, spec=".2f", suffix=""):
    return "–" if v is None else f"{v:{spec}}{suffix}"


def _quality(m: dict) -> str:
    """The headline quality of a target: accuracy, top-1 agreement, the task's first score, or the worst cosine."""
    if "accuracy" in m:
        return _fmt(m["accuracy"], suffix=" %")
    if "top1_agreement" in m:
        return _fmt(m["top1_agreement"], suffix=" % agree")
    task = m.get("task")
    if task and task.get("artifact"):
        key = (task.get("evaluator_scores") or list(task["artifact"]))[0]
        return f"{key} {task['artifact'][key]:.4g}"
    return _fmt(m.get("cosine_min"), ".4f", " cos") if m else "–"


def summary_rows(manifest: dict) -> list[dict]:
    rows = []
    for name, t in manifest["targets"].items():
        m, lat, r = t.get("metrics") or {}, t.get("latency") or {}, t.get("ratios") or {}
        rows.append({
            "target": name, "verdict": t["verdict"].upper(), "artifact": t.get("artifact", "–"),
            "accuracy": _quality(m),
            "drop": _fmt(m.get("accuracy_drop"), "+.2f", " pt") if "accuracy_drop" in m else "–",
            "p50": _fmt(lat.get("p50_ms"), ".3f", " ms"),
            "size": _fmt((t.get("size_bytes") or 0) / 1e6 if t.get("size_bytes") else None, ".3f", " MB"),
            "size_ratio": _fmt(r.get("size_vs_fp32"), ".3f", "×"),
            "speedup": _fmt(r.get("speedup_vs_fp32"), ".2f", "×"),
        })
    return rows


def write_report(manifest: dict, path: Path) -> None:
    model = manifest["model"]
    lines = [
        f"# edgebuild report — {manifest['verdict'].upper()}", "",
        f"- model: {model['source']} (exporter: {model.get('exporter')}, opset {model.get('opset')})",
        f"- FP32 reference accuracy: {_fmt(model.get('accuracy'), suffix=' %')}",
        f"- calibration: {manifest['data']['calibration']['samples']} samples from {manifest['data']['calibration']['name']}; "
        f"evaluation: {manifest['data']['evaluation']['samples']} samples from {manifest['data']['evaluation']['name']} (disjoint)",
        f"- built in {manifest['seconds']} s with edgebuild {manifest['edgebuild']}",
        *_judging_lines(manifest.get("judging") or {}), "",
        "| target | verdict | artifact | accuracy | drop vs FP32 | p50 latency | size | size vs FP32 | speed vs FP32 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary_rows(manifest):
        lines.append(f"| {r['target']} | {r['verdict']} | {r['artifact']} | {r['accuracy']} | {r['drop']} | {r['p50']} | "
                     f"{r['size']} | {r['size_ratio']} | {r['speedup']} |")
    if manifest.get("compression"):
        from edgebuild.pipeline.compress import markdown

        lines += ["", *markdown(manifest["compression"])]
    for name, t in manifest["targets"].items():
        lines += ["", f"## {name}", "", t["profile"]["description"].strip(), ""]
        if t["verdict"] == "error":
            lines.append(f"**Conversion failed:** {t['error']}")
            continue
        if t["failures"]:
            lines += ["**Budget failures:**", *[f"- {f}" for f in t["failures"]], ""]
        lines += _output_table(t.get("metrics") or {})
        lines.append(f"- settings: `{t['settings']}`")
        if t.get("host_validation"):
            lines.append(f"- host validation: {t['host_validation']}")
        for note in t.get("notes") or []:
            lines.append(f"- note: {note}")
        search = t.get("search")
        if search:
            lines += ["", "Accuracy search (every configuration tried):", "",
                      "| # | configuration | quality | size | p50 | result |", "|---|---|---|---|---|---|"]
            for i, a in enumerate(search.get("tries", []), 1):
                q = next((f"{k} {v:.4g}" for k, v in a.items() if isinstance(v, float) and k not in
                          ("latency_p50_ms", "quality_loss")), "–")
                lines.append(f"| {i} | {a.get('label', '')} | {q} | {a['size_bytes'] / 1e6:.3f} MB | "
                             f"{_fmt(a.get('latency_p50_ms'), '.3f', ' ms')} | {'ok' if not a['failures'] else '; '.join(a['failures'])} |")
            if search.get("float_layers"):
                lines += ["", "Layers kept in float (sensitivity = quality lost when only this layer is quantized):", ""]
                lines += [f"- `{n}`: {s:.2f}" for n, s in search["float_layers"].items()]
    path.write_text("\n".join(lines) + "\n")


def _judging_lines(j: dict) -> list[str]:
    lines = []
    if j:
        what = f"task {j.get('task', 'auto')}" + (f", evaluator `{j['evaluator']}`" if j.get("evaluator") else "")
        lines.append(f"- judged per output ({', '.join(j.get('outputs', []))}): {what}; labels score "
                     f"{'output ' + j['labels_output'] if j.get('labels_output') else 'no output'}")
    lines += [f"- **warning:** {w}" for w in j.get("warnings", [])]
    return lines


def _output_table(m: dict) -> list[str]:
    """Each output's own metrics, and the task's scores next to the FP32 reference's."""
    if not m.get("outputs"):
        return []
    lines = ["| output | kind | cosine | SQNR | max abs error | top-1 agree | accuracy (FP32) | worst channel group |",
             "|---|---|---|---|---|---|---|---|"]
    for name, o in m["outputs"].items():
        groups = [g for g in o.get("groups", []) if g.get("judged")]
        worst = min(groups, key=lambda g: g["cosine"], default=None)
        group = f"{worst['slices']} (axis {worst['axis']}): cos {worst['cosine']:.4f}" if worst else "–"
        acc = f"{o['accuracy']:.2f} % ({o['accuracy_reference']:.2f} %)" if "accuracy" in o else "–"
        lines.append(f"| {name} | {o['kind']} | {_fmt(o.get('cosine'), '.4f')} | {_fmt(o.get('sqnr_db'), '.1f', ' dB')} | "
                     f"{_fmt(o.get('max_abs_error'), '.3g')} | {_fmt(o.get('top1_agreement'), '.2f', ' %')} | {acc} | {group} |")
    task = m.get("task")
    if task:
        lines += ["", f"Task scores ({task['name']}):", "", "| score | FP32 | artifact |", "|---|---|---|"]
        lines += [f"| {k} | {task['reference'].get(k, float('nan')):.4g} | {v:.4g} |" for k, v in task["artifact"].items()]
    return ["", *lines, ""]
