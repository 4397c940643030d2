"""PNG bar charts of benchmark tables, drawn with PIL (no plotting library in the dependencies).

One chart per table: a group of bars per (case, mode) row group, one bar per provider, the bar
height being the chosen value (ms, GB/s, TFLOP/s, ...), with the value printed above each bar.
"""
from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

PALETTE = [(70, 110, 190), (220, 120, 50), (90, 160, 90), (170, 80, 160), (200, 70, 70), (110, 110, 110)]


def bar_chart(rows: list[dict], value: str, group_by: list[str], path: str | Path, title: str = "",
              series: str = "provider") -> Path | None:
    """Write the chart of `rows[value]` grouped by `group_by`, one colour per `series`; None if no values."""
    rows = [r for r in rows if isinstance(r.get(value), (int, float))]
    if not rows:
        return None
    groups = list(dict.fromkeys(tuple(r.get(k) for k in group_by) for r in rows))
    names = list(dict.fromkeys(r[series] for r in rows))
    top = max(float(r[value]) for r in rows) or 1.0
    bar_w, gap, plot_h = 18, 14, 220
    width = max(360, 50 + len(groups) * (len(names) * bar_w + gap) + 20)
    height = plot_h + 80 + 12 * len(group_by)
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    left, bottom = 50, 30 + plot_h
    draw.text((left, 8), title or value, fill="black")
    draw.line([(left, 30), (left, bottom), (width - 10, bottom)], fill="black")
    draw.text((4, 30), f"{top:.3g}", fill="black")
    draw.text((4, bottom - 10), "0", fill="black")
    x = left + gap
    for group in groups:
        for i, name in enumerate(names):
            row = next((r for r in rows if tuple(r.get(k) for k in group_by) == group and r[series] == name), None)
            if row is not None:
                h = plot_h * float(row[value]) / top
                draw.rectangle([x + i * bar_w, bottom - h, x + (i + 1) * bar_w - 2, bottom], fill=PALETTE[i % 6])
                draw.text((x + i * bar_w, bottom - h - 11), f"{float(row[value]):.2g}", fill="black")
        chars = max(4, (len(names) * bar_w + gap) // 6)  # PIL's default font is about 6 px wide
        for line, part in enumerate(group):  # one line per grouping column, clipped to the group
            draw.text((x, bottom + 4 + 12 * line), str(part)[:chars], fill="black")
        x += len(names) * bar_w + gap
    for i, name in enumerate(names):  # legend
        draw.rectangle([left + i * 110, height - 22, left + i * 110 + 10, height - 12], fill=PALETTE[i % 6])
        draw.text((left + i * 110 + 14, height - 24), str(name), fill="black")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG")
    return path
