"""report.md: the Markdown report of a results.json (`render_report`), for people.

What was evaluated and how, the results table (per category and overall, with 95 % intervals;
POPE's metrics added; multiple choice's unparseable answers listed; Recall@K per direction for
retrieval; the caption metrics), the coverage, the plots and the
command; rendered from results.json alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vitune.evaluation.runner import CAPTION, RETRIEVAL
from vitune.evaluation.tables import _caption_coverage, _ci, _pct, _retrieval_rows


def render_report(results: Mapping[str, Any]) -> str:
    """The Markdown report of a results.json."""
    if results["task"] == RETRIEVAL:
        return _render_retrieval_report(results)
    if results["task"] == CAPTION:
        return _render_caption_report(results)
    bench, data = results["bench"], results["data"]
    title = bench["name"] if bench else Path(data["questions"]["path"]).name
    lines = [f"# Evaluation: {title}", ""]
    lines += [_source(results), *_bench_line(bench)]
    lines.append(f"- **questions**: `{data['questions']['path']}` ({data['questions']['n']} questions, SHA-256 "
                 f"`{data['questions']['sha256'][:16]}…`)")
    lines.append(f"- **answers**: `{data['answers']['path']}` (SHA-256 `{data['answers']['sha256'][:16]}…`)")
    lines.append(f"- **task**: {results['task']}; **prompt**: `{results['prompt']}`")
    if results["decoding"]:
        d = results["decoding"]
        lines.append(f"- **decoding**: {d['strategy']}, max_new_tokens {d['max_new_tokens']}, temperature "
                     f"{d['temperature']}, top_p {d['top_p']}, seed {d['seed']}; batch size {d['batch_size']}, "
                     f"{d['precision']}")
    speed = f", {results['questions_per_s']:.1f} questions/s" if results.get("questions_per_s") else ""
    lines.append(f"- **date**: {results['created']}; vitune {results['vitune_version']}; wall time "
                 f"{results['wall_time_s']} s{speed}")
    lines += ["", "## Results", ""]
    pope, choice = results["task"] == "pope", results["task"] == "choice"
    head = "| category | n | accuracy | 95 % CI |" + (" precision | recall | F1 | yes-ratio |" if pope else "") \
        + (" unparseable |" if pope or choice else "")
    lines += [head, "|---|---:|---:|---|" + ("---:|---:|---:|---:|" if pope else "") + ("---:|" if pope or choice else "")]
    for c, m in [*results["per_category"].items(), ("**overall**", results["metrics"])]:
        row = f"| {c} | {m['n']} | {_pct(m['accuracy'])} % | {_ci(m)} % |"
        if pope:
            row += (f" {_pct(m['precision'])} % | {_pct(m['recall'])} % | {_pct(m['f1'])} % | "
                    f"{_pct(m['yes_ratio'])} % |")
        if pope or choice:
            row += f" {m['n_unparseable']} |"
        lines.append(row)
    if choice and results["metrics"]["n_unparseable"]:
        bad = results["metrics"]["unparseable"]
        shown = ", ".join(f"`{q}`" for q in bad[:20]) + (f" … ({len(bad) - 20} more)" if len(bad) > 20 else "")
        lines += ["", f"{len(bad)} answer(s) name no single option letter ({results['metrics']['letters']}) and count "
                  f"as wrong (their text is in `predictions.jsonl`): {shown}"]
    cov = results["coverage"]
    lines += ["", "## Coverage", ""]
    every = f"- every one of the {cov['n_scored']} scored questions has a prediction"
    lines += [f"- {line}" for line in cov["lines"]] or [every]
    if cov["n_skipped"]:
        lines.append(f"- {cov['n_skipped']} question(s) skipped as bad records (`{cov['skipped_file']}`), counted "
                     "as wrong")
    plots = results.get("files", {}).get("plots", [])
    if plots:
        lines += ["", "## Plots", ""]
        lines += [f"![{p.removesuffix('.png')}]({p})" for p in plots]
    if results["command"]:
        lines += ["", "## Command", "", f"    {results['command']}"]
    return "\n".join(lines) + "\n"


def _render_retrieval_report(results: Mapping[str, Any]) -> str:
    bench, model, data, m = results["bench"], results["model"], results["data"], results["metrics"]
    title = bench["name"] if bench else Path(data["captions"]["path"]).name
    e, proto = results["embedding"], results["protocol"]
    lines = [f"# Evaluation: {title}", "",
             f"- **model**: `{model['path']}` (model.safetensors SHA-256 `{model['weights_sha256'][:16]}…`)"]
    if bench:
        params = ", ".join(f"{k}={v}" for k, v in bench["params"].items() if v is not None)
        lines.append(f"- **bench**: {bench['name']} ({bench['description']}; {params})")
    lines += [(f"- **captions**: `{data['captions']['path']}` ({data['captions']['n']} captions of "
               f"{data['n_images']} images, SHA-256 `{data['captions']['sha256'][:16]}…`)"),
              (f"- **task**: retrieval; {proto['similarity']} similarity; image → text: a hit when "
               f"{proto['i2t_hit']}; text → image: when {proto['t2i_hit']}; ties {proto['ties']}"),
              (f"- **embedding**: batch size {e['batch_size']}, {e['precision']}, captions cut to "
               f"{e['text_max_len']} tokens ({e['n_captions_cut']} were)"),
              (f"- **date**: {results['created']}; vitune {results['vitune_version']}; wall time "
               f"{results['wall_time_s']} s"), "", "## Results", ""]
    ks = list(m["i2t"])
    lines += ["| direction | n | " + " | ".join(ks) + " |", "|---|---:|" + "---:|" * len(ks)]
    for label, n, recall in _retrieval_rows(results):
        lines.append(f"| {label.replace('->', '→')} | {n} | " + " | ".join(f"{_pct(v)} %" for v in recall.values()) + " |")
    if results["command"]:
        lines += ["", "## Command", "", f"    {results['command']}"]
    return "\n".join(lines) + "\n"


def _source(results: Mapping[str, Any]) -> str:
    model = results["model"]
    if model:
        return f"- **model**: `{model['path']}` (model.safetensors SHA-256 `{model['weights_sha256'][:16]}…`)"
    return (f"- **predictions**: `{results['predictions']['source']}` (SHA-256 "
            f"`{results['predictions']['sha256'][:16]}…`)")


def _bench_line(bench: Mapping[str, Any] | None) -> list[str]:
    if not bench:
        return []
    params = ", ".join(f"{k}={v}" for k, v in bench["params"].items() if v is not None)
    return [f"- **bench**: {bench['name']} ({bench['description']}; {params})"]


def _render_caption_report(results: Mapping[str, Any]) -> str:
    bench, data, m = results["bench"], results["data"], results["metrics"]
    title = bench["name"] if bench else Path(data["captions"]["path"]).name
    lines = [f"# Evaluation: {title}", "", _source(results), *_bench_line(bench)]
    lines.append(f"- **captions**: `{data['captions']['path']}` ({data['captions']['n']} reference captions of "
                 f"{data['n_images']} images, SHA-256 `{data['captions']['sha256'][:16]}…`)")
    lines.append(f"- **task**: caption; **prompt**: `{results['prompt']}`; **scorer**: {results['scorer']}")
    if results["decoding"]:
        d = results["decoding"]
        lines.append(f"- **decoding**: {d['strategy']}, max_new_tokens {d['max_new_tokens']}; batch size "
                     f"{d['batch_size']}, {d['precision']}")
    speed = f", {results['questions_per_s']:.1f} images/s" if results.get("questions_per_s") else ""
    lines.append(f"- **date**: {results['created']}; vitune {results['vitune_version']}; wall time "
                 f"{results['wall_time_s']} s{speed}")
    names = [k for k in m if k != "n"]
    lines += ["", "## Results", "", "| n | " + " | ".join(names) + " |", "|---:|" + "---:|" * len(names),
              f"| {m['n']} | " + " | ".join("-" if m[k] is None else f"{100 * m[k]:.1f}" for k in names) + " |",
              "", "Scores ×100 (CIDEr too, so 100 = 1.0 on its 0-10 scale)."]
    cov = _caption_coverage(results["coverage"])
    lines += ["", "## Coverage", ""] + ([f"- {line}" for line in cov] or
                                       [f"- every one of the {m['n']} images has a caption"])
    if results["command"]:
        lines += ["", "## Command", "", f"    {results['command']}"]
    return "\n".join(lines) + "\n"
