"""The human report (Markdown) written next to manifest.json."""
from __future__ import annotations

from pathlib import Path


def _fmt(v, spec=".2f", suffix=""):
    return "–" if v is None else f"{v:{spec}}{suffix}"


def summary_rows(manifest: dict) -> list[dict]:
    rows = []
    for name, t in manifest["targets"].items():
        m, lat, r = t.get("metrics") or {}, t.get("latency") or {}, t.get("ratios") or {}
        rows.append({
            "target": name, "verdict": t["verdict"].upper(), "artifact": t.get("artifact", "–"),
            "accuracy": _fmt(m.get("accuracy"), suffix=" %") if "accuracy" in m else _fmt(m.get("top1_agreement"), suffix=" % agree"),
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
        f"- built in {manifest['seconds']} s with edgebuild {manifest['edgebuild']}", "",
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
                q = next((f"{k} {v:.2f}" for k, v in a.items() if k in ("accuracy_drop", "top1_disagreement", "cosine_min")), "–")
                lines.append(f"| {i} | {a.get('label', '')} | {q} | {a['size_bytes'] / 1e6:.3f} MB | "
                             f"{_fmt(a.get('latency_p50_ms'), '.3f', ' ms')} | {'ok' if not a['failures'] else '; '.join(a['failures'])} |")
            if search.get("float_layers"):
                lines += ["", "Layers kept in float (sensitivity = quality lost when only this layer is quantized):", ""]
                lines += [f"- `{n}`: {s:.2f}" for n, s in search["float_layers"].items()]
    path.write_text("\n".join(lines) + "\n")
