"""evaluate_dti.py's outputs: the aggregation over subjects, metrics.csv and table.csv, the pictures (fidelity.png,
curve.png) and the report, written once as blocks and rendered twice: report.md and report.html (one page that opens in
a browser, pictures by relative path).

`result` is the content of metrics.json (see evaluate_dti.main); every number of the reports and pictures is read
from it.
"""

import csv
import html
import os
import re

from dti_files import atomic_write, write_text
from dti_metrics import TEXT_METRICS, summary


__all__ = [
    "PLOT_PAIRS",
    "fmt",
    "subject_table",
    "table_points",
    "plot_fidelity",
    "plot_curves",
    "write_csv",
    "write_table_csv",
    "report_blocks",
    "to_markdown",
    "to_html",
    "write_reports",
]

PLOT_PAIRS = (("subject_dino", "text_siglip"), ("subject_clip", "text_clip"))  # (x, y) of each fidelity.png panel


def fmt(score):
    """mean ± standard error (the mean alone when there is no standard error)."""
    return f"{score['mean']:.4f} ± {score['se']:.4f}" if score["se"] is not None else f"{score['mean']:.4f}"


# ----------------------------------------------------------------------------------------------------
# Over subjects: one row per prompt set, method and step
# ----------------------------------------------------------------------------------------------------


def subject_table(entries, metrics):
    """The paper's table: per prompt set, method and step, each metric's mean over the subjects of the per-subject
    means (unweighted: every subject counts once) and its standard error over subjects. entries: metrics.json's
    "embeddings" of a --runs evaluation (method, subject, step, sets)."""
    groups = {}
    for e in entries:
        for set_name, group in e["sets"].items():
            groups.setdefault((set_name, e["method"], e["step"]), []).append((e["subject"], e["kind"], group))
    rows = []
    for (set_name, method, step), members in groups.items():
        members.sort(key=lambda m: m[0])
        rows.append(
            {
                "prompt_set": set_name,
                "method": method,
                "kind": ", ".join(sorted({kind for _, kind, _ in members})),
                "step": step,
                "n_subjects": len(members),
                "scores": {m: summary([g["scores"][m]["mean"] for *_, g in members]) for m in metrics},
                "subjects": {s: {m: g["scores"][m]["mean"] for m in metrics} for s, _, g in members},
            }
        )
    order = {name: i for i, name in enumerate(dict.fromkeys(e["method"] for e in entries))}
    rows.sort(key=lambda r: (r["prompt_set"], order[r["method"]], -1 if r["step"] is None else r["step"]))
    return rows


def table_points(table):
    """The table's rows as fidelity.png's points: one per method and step, with every prompt set."""
    points = {}
    for r in table:
        label = f"{r['method']}@{r['step']}"
        point = points.setdefault(label, {"label": label, "group": r["method"], "order": r["step"], "sets": {}})
        point["sets"][r["prompt_set"]] = {"scores": r["scores"]}
    return list(points.values())


# ----------------------------------------------------------------------------------------------------
# Pictures: fidelity.png (text against subject fidelity) and curve.png (each metric over training steps)
# ----------------------------------------------------------------------------------------------------


def _figure(panels, height=5.5):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5 * panels, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, panels, squeeze=False)[0]


def _save(fig, path):
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    return path


def plot_fidelity(points, metric_ids, path):
    """fidelity.png: per panel (PLOT_PAIRS), subject fidelity (x) against text fidelity (y) with standard-error bars,
    one point per point and prompt set; points of one group (a run's checkpoints, a method's steps) share a colour and
    are joined in order. points: [{"label", "group", "order", "sets": {set: {"scores": {metric: {mean, se}}}}}]. Agg
    canvas, no pyplot state."""
    from matplotlib.lines import Line2D

    pairs = [(x, y) for x, y in PLOT_PAIRS if x in metric_ids and y in metric_ids]
    if not pairs:
        return None
    fig, axes = _figure(len(pairs))
    markers = "osD^vP*X"
    sets = list(dict.fromkeys(s for p in points for s in p["sets"]))
    colors = {g: f"C{i % 10}" for i, g in enumerate(dict.fromkeys(p["group"] for p in points))}
    for ax, (x, y) in zip(axes, pairs):
        for k, name in enumerate(sets):
            for p in points:
                scores = p["sets"][name]["scores"]
                ax.errorbar(
                    scores[x]["mean"],
                    scores[y]["mean"],
                    xerr=scores[x]["se"] or 0,
                    yerr=scores[y]["se"] or 0,
                    fmt=markers[k % len(markers)],
                    color=colors[p["group"]],
                    capsize=3,
                )
                ax.annotate(
                    p["label"],
                    (scores[x]["mean"], scores[y]["mean"]),
                    textcoords="offset points",
                    xytext=(5, 5),
                    fontsize=8,
                )
            for group in colors:
                line = sorted((p for p in points if p["group"] == group), key=lambda p: p["order"] or 0)
                if len(line) > 1:
                    ax.plot(
                        [p["sets"][name]["scores"][x]["mean"] for p in line],
                        [p["sets"][name]["scores"][y]["mean"] for p in line],
                        color=colors[group],
                        linewidth=0.8,
                        alpha=0.6,
                        zorder=0,
                    )
        ax.set_xlabel(f"subject fidelity: {x} ({metric_ids[x]})", fontsize=9)
        ax.set_ylabel(f"text fidelity: {y} ({metric_ids[y]})", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(
            handles=[
                Line2D([], [], marker=markers[k % len(markers)], color="black", linestyle="none", label=name)
                for k, name in enumerate(sets)
            ],
            title="prompt set",
            fontsize=8,
        )
    fig.suptitle("Up and to the right is better: follows the prompt and keeps the likeness")
    return _save(fig, path)


def plot_curves(table, metric_ids, path):
    """curve.png: one panel per metric, its mean over subjects (± standard error) against the training step, one line
    per method and prompt set."""
    metrics = [m for m in metric_ids if any(m in r["scores"] for r in table)]
    fig, axes = _figure(len(metrics), height=4.5)
    styles = ["-", "--", ":", "-."]
    methods = list(dict.fromkeys(r["method"] for r in table))
    sets = list(dict.fromkeys(r["prompt_set"] for r in table))
    for ax, metric in zip(axes, metrics):
        for i, method in enumerate(methods):
            for k, name in enumerate(sets):
                rows = [r for r in table if r["method"] == method and r["prompt_set"] == name]
                ax.errorbar(
                    [r["step"] for r in rows],
                    [r["scores"][metric]["mean"] for r in rows],
                    yerr=[r["scores"][metric]["se"] or 0 for r in rows],
                    color=f"C{i % 10}",
                    linestyle=styles[k % len(styles)],
                    marker="o",
                    capsize=3,
                    label=f"{method} ({name})" if len(sets) > 1 else method,
                )
        ax.set_xticks(sorted({r["step"] for r in table if r["step"] is not None}))
        ax.set_xlabel("training step")
        ax.set_title(f"{metric} ({metric_ids[metric]})", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Mean over subjects ± standard error")
    return _save(fig, path)


# ----------------------------------------------------------------------------------------------------
# CSV
# ----------------------------------------------------------------------------------------------------


def _write_rows(path, header, rows):
    def write(tmp):
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            out = csv.writer(f)
            out.writerow(header)
            out.writerows(["" if v is None else v for v in row] for row in rows)

    atomic_write(path, write)


def _score_cells(scores, metrics):
    return [None if v is None else repr(v) for m in metrics for v in (scores[m]["mean"], scores[m]["se"])]


def write_csv(result, path):
    """metrics.csv: one row per embedding for all its images, per prompt set and per prompt."""
    metrics = list(result["metrics"])
    header = ["embedding", "method", "subject", "step", "prompt_set", "prompt_index", "prompt", "n"]
    header += [f"{m}_{s}" for m in metrics for s in ("mean", "se")]
    rows = []
    for e in result["embeddings"]:
        head = [e["label"], e["method"], e.get("subject"), e.get("step")]
        rows.append(head + ["all", None, None, e["all"]["n"]] + _score_cells(e["all"]["scores"], metrics))
        for set_name, group in e["sets"].items():
            rows.append(head + [set_name, None, None, group["n"]] + _score_cells(group["scores"], metrics))
            for p in group["prompts"]:
                rows.append(head + [set_name, p["index"], p["prompt"], p["n"]] + _score_cells(p["scores"], metrics))
    _write_rows(path, header, rows)


def write_table_csv(result, path):
    """table.csv: the over-subject table, one row per prompt set, method and step."""
    metrics = list(result["metrics"])
    header = ["prompt_set", "method", "kind", "step", "n_subjects"] + [
        f"{m}_{s}" for m in metrics for s in ("mean", "se")
    ]
    rows = [
        [r["prompt_set"], r["method"], r["kind"], r["step"], r["n_subjects"]] + _score_cells(r["scores"], metrics)
        for r in result["table"]
    ]
    _write_rows(path, header, rows)


# ----------------------------------------------------------------------------------------------------
# The report: blocks, rendered as Markdown and as HTML
# ----------------------------------------------------------------------------------------------------


def _settings_blocks(result):
    g = result["generation"]
    precision = {"no": "float32"}.get(g["mixed_precision"], g["mixed_precision"])
    size = f"{g['image_size'][0]}x{g['image_size'][1]}" if g.get("image_size") else "the pipeline's default size"
    guidance = g["guidance_scale"] if g["guidance_scale"] is not None else "the pipeline's default"
    blocks = [
        (
            "text",
            f"Protocol `{result['protocol']}`. {g['pipeline']} with `{g['scheduler']}`, {g['num_inference_steps']} "
            f"steps, guidance {guidance}, {size}, {precision}, seeds {result['seeds']} (one "
            f"{g['generator_device']} generator per image). Each cell: mean ± standard error.",
        )
    ]
    if result["deviations"]:
        blocks.append(("text", "Settings that differ from the paper protocol: " + "; ".join(result["deviations"])))
    rows = [[f"`{m}`", f"`{info['model']}`", info["description"]] for m, info in result["metrics"].items()]
    blocks.append(("table", ["metric", "model", "what it measures"], rows))
    return blocks


def _embedding_blocks(result, pictures):
    metrics = result["metrics"]
    blocks = [("image", "fidelity.png", "text against subject fidelity")] if "fidelity.png" in pictures else []
    for set_name in result["prompt_sets"]:
        rows = []
        for e in result["embeddings"]:
            norms = ", ".join(f"{n:.4g} ({n / e['vocabulary_mean_norm'][k]:.2f}x vocab)" for k, n in e["norm"].items())
            rows.append([e["label"], e["method"], norms] + [fmt(e["sets"][set_name]["scores"][m]) for m in metrics])
        blocks += [
            ("heading", 2, f"Prompt set `{set_name}`"),
            ("table", ["embedding", "method", "norm", *metrics], rows),
        ]
        grid = f"grid_{set_name}.png"
        if grid in pictures:
            blocks += [
                ("image", grid, f"grid of {set_name}"),
                ("text", f"Rows: embeddings; columns: the prompts below; seed {result['seeds'][0]}."),
            ]
        text_metrics = [m for m in TEXT_METRICS if m in metrics]
        header = ["#", "prompt"] + [f"{e['label']} {m}" for e in result["embeddings"] for m in text_metrics]
        prompts = result["embeddings"][0]["sets"][set_name]["prompts"]
        rows = [
            [str(i + 1), p["prompt"]]
            + [fmt(e["sets"][set_name]["prompts"][i]["scores"][m]) for e in result["embeddings"] for m in text_metrics]
            for i, p in enumerate(prompts)
        ]
        blocks.append(("details", "Per prompt", [("table", header, rows)]))
    return blocks


def _runs_blocks(result, pictures):
    metrics = result["metrics"]
    subjects = result["subjects"]
    live = sum(s["live"] for s in subjects.values())
    masked = "masked references" if any(s["masks"] for s in subjects.values()) else "unmasked references"
    blocks = [
        (
            "text",
            f"{len(subjects)} subject(s) ({live} live: cat or dog), {masked}. Per method and step: the mean over "
            "subjects of each subject's mean over its images, ± the standard error over subjects.",
        )
    ]
    blocks += [("image", p, alt) for p, alt in (("curve.png", "scores over steps"), ("fidelity.png", "fidelity"))]
    blocks = [b for b in blocks if b[0] != "image" or b[1] in pictures]
    for set_name in result["prompt_sets"]:
        rows = [r for r in result["table"] if r["prompt_set"] == set_name]
        blocks += [
            ("heading", 2, f"Prompt set `{set_name}`"),
            (
                "table",
                ["method", "kind", "step", "subjects", *metrics],
                [
                    [r["method"], r["kind"], str(r["step"]), str(r["n_subjects"])]
                    + [fmt(r["scores"][m]) for m in metrics]
                    for r in rows
                ],
            ),
        ]
        for r in rows:
            detail = [[s, subjects[s]["class"]] + [f"{v[m]:.4f}" for m in metrics] for s, v in r["subjects"].items()]
            blocks.append(
                (
                    "details",
                    f"{r['method']} at step {r['step']}: per subject",
                    [("table", ["subject", "class", *metrics], detail)],
                )
            )
        grids = [p for p in pictures if p.startswith("grids/") and p.endswith(f"--{set_name}.png")]
        if grids:
            images = []
            for p in grids:
                subject = p[len("grids/") : -len(f"--{set_name}.png")]
                images += [("text", f"`{subject}`"), ("image", p, f"{subject}, {set_name}")]
            blocks.append(
                (
                    "details",
                    "Images: per subject, each method at its last step (rows), the prompts (columns), the first seed",
                    images,
                )
            )
    return blocks


def report_blocks(result, pictures):
    """The report as blocks: ("heading", level, text), ("text", text), ("table", header, rows), ("image", relative
    path, alt), ("details", summary, blocks). Text may hold `code`."""
    blocks = [("heading", 1, f"Evaluation on {result['model']}")] + _settings_blocks(result)
    if result["mode"] == "runs":
        return blocks + _runs_blocks(result, pictures)
    blocks.insert(
        2,
        (
            "text",
            f"Class word `{result['class_word']}`, {result['num_reference_images']} reference image(s)"
            + (" (masked)." if result["reference_masks"] else "."),
        ),
    )
    return blocks + _embedding_blocks(result, pictures)


def to_markdown(blocks):
    lines = []
    for block in blocks:
        kind = block[0]
        if kind == "heading":
            lines += ["#" * block[1] + " " + block[2], ""]
        elif kind == "text":
            lines += [block[1], ""]
        elif kind == "table":
            lines += ["| " + " | ".join(block[1]) + " |", "|" + "---|" * len(block[1])]
            lines += ["| " + " | ".join(row) + " |" for row in block[2]] + [""]
        elif kind == "image":
            lines += [f"![{block[2]}]({block[1]})", ""]
        else:
            lines += [
                f"<details><summary>{block[1]}</summary>",
                "",
                to_markdown(block[2]).rstrip(),
                "",
                "</details>",
                "",
            ]
    return "\n".join(lines)


def _inline(text):
    return re.sub(r"`([^`]*)`", r"<code>\1</code>", html.escape(text, quote=False))


def _html_blocks(blocks):
    parts = []
    for block in blocks:
        kind = block[0]
        if kind == "heading":
            parts.append(f"<h{block[1]}>{_inline(block[2])}</h{block[1]}>")
        elif kind == "text":
            parts.append(f"<p>{_inline(block[1])}</p>")
        elif kind == "table":
            head = "".join(f"<th>{_inline(c)}</th>" for c in block[1])
            body = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>" for row in block[2])
            parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif kind == "image":
            parts.append(f'<figure><img src="{html.escape(block[1])}" alt="{html.escape(block[2])}"></figure>')
        else:
            parts.append(f"<details><summary>{_inline(block[1])}</summary>{_html_blocks(block[2])}</details>")
    return "\n".join(parts)


_STYLE = (
    "body{font-family:sans-serif;margin:2em;max-width:100%}table{border-collapse:collapse;margin:1em 0}"
    "td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}th{background:#f3f3f3}img{max-width:100%}"
    "code{background:#f3f3f3;padding:0 3px}"
)


def to_html(blocks, title):
    return (
        f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{html.escape(title)}</title>\n'
        f"<style>{_STYLE}</style>\n</head>\n<body>\n{_html_blocks(blocks)}\n</body>\n</html>\n"
    )


def write_reports(result, out_dir, pictures):
    """report.md and report.html in out_dir from the same blocks; pictures: paths relative to out_dir."""
    blocks = report_blocks(result, pictures)
    paths = [os.path.join(out_dir, "report.md"), os.path.join(out_dir, "report.html")]
    write_text(paths[0], to_markdown(blocks))
    write_text(paths[1], to_html(blocks, f"DTI evaluation on {result['model']}"))
    return paths
