"""What a run reports: results.json, the paper-style table results.md, and each method's accuracy-matrix heatmap."""
import os

import data
import files


def results_markdown(results):
    """A paper-style table: one row per method, per-task final scores, then Last and Avg."""
    tasks = results["tasks"]
    head = ["Method"] + tasks + ["Last", "Avg", "BWT"]
    lines = [f"**{results['setting']}**, beta={results['beta']}, seed={results['seed']}", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    fmt = lambda v: "–" if v is None else f"{v:.2f}"
    for name, r in results["methods"].items():
        cells = [fmt(r["per_task_last"].get(t)) for t in tasks] + [fmt(r["last"]), fmt(r["avg"]), fmt(r["bwt"])]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    personal = {name: r["personalized"] for name, r in results["methods"].items() if r.get("personalized")}
    if personal:
        lines += ["", "Personalized: each client's own model on the tasks it trained on", "",
                  "| Method | Client | Own tasks | Mean |", "|---|---|---|---|"]
        for name, p in personal.items():
            for c, d in p["clients"].items():
                own = ", ".join(f"{t} {fmt(v)}" for t, v in d["tasks"].items())
                lines.append(f"| {name} | {c} | {own} | {fmt(d['mean'])} |")
            lines.append(f"| {name} | mean over clients | | **{fmt(p['mean'])}** |")
    return "\n".join(lines) + "\n"


def draw_matrix(matrix, tasks, title, path):
    """Accuracy-matrix heatmap with Pillow: rows are tasks, columns are stages, values in the cells."""
    from PIL import Image, ImageDraw, ImageFont
    font = ImageFont.load_default()
    cell_w, cell_h, left, top = 56, 24, 8 + 7 * max(len(t) for t in tasks), 40
    n_stages = len(matrix)
    img = Image.new("RGB", (left + cell_w * n_stages + 10, top + cell_h * len(tasks) + 10), "white")
    d = ImageDraw.Draw(img)
    d.text((8, 6), title, fill="black", font=font)
    for t in range(n_stages):
        d.text((left + t * cell_w + 14, top - 16), f"T{t + 1}", fill="black", font=font)
    for i, task in enumerate(tasks):
        y = top + i * cell_h
        d.text((6, y + 6), task, fill="black", font=font)
        for t in range(n_stages):
            x, v = left + t * cell_w, matrix[t][i]
            if v is None:
                colour = (235, 235, 235)
            else:  # white (0) -> blue (100)
                s = max(0.0, min(1.0, v / 100.0))
                colour = (int(255 - 200 * s), int(255 - 150 * s), 255)
            d.rectangle([x, y, x + cell_w - 2, y + cell_h - 2], fill=colour)
            if v is not None:
                d.text((x + 10, y + 6), f"{v:.1f}", fill="black" if v < 60 else "white", font=font)
    files.atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))



def write_results(results, out):
    """results.json, results.md (also printed) and one heatmap per method into `out`."""
    data.atomic_write_json(os.path.join(out, "results.json"), results, indent=1)
    md = results_markdown(results)

    def write_md(tmp):
        with open(tmp, "w") as f:
            f.write(md)
    files.atomic_write(os.path.join(out, "results.md"), write_md)
    for name, r in results["methods"].items():
        draw_matrix(r["matrix"], results["tasks"], f"{name} - {results['setting']}",
                    os.path.join(out, f"matrix_{name}.png"))
    print("\n" + md)
    print(f"wrote {out}/results.json, results.md, matrix_<method>.png")
