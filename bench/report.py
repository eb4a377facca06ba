"""The benchmark's outputs: a printed table, a JSON file and a PNG bar chart."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

MIB = 1024 * 1024
COLUMNS = (
    ("run", "{:<36}"),
    ("img/s", "{:>7.1f}"),
    ("steady", "{:>7}"),
    ("CPU ms/img", "{:>10.2f}"),
    ("steady CPU", "{:>10}"),
    ("srv ms/img", "{:>10.2f}"),
    ("client MiB", "{:>10.0f}"),
    ("tree MiB", "{:>8.0f}"),
    ("x ceiling", "{:>9.2f}"),
    ("x ceiling CPU", "{:>13.2f}"),
    ("x tutorial", "{:>10.2f}"),
    ("x img2dataset", "{:>13}"),
)


def derive(
    rows: list[dict[str, Any]],
    ceiling: float,
    ceiling_cpu: float,
    tutorial: float | None,
    img2dataset: float | None = None,
) -> None:
    """Add rates and ratios to each measured row, in place.

    `x ceiling` compares throughput; `x ceiling CPU` compares CPU per image (steady
    state where known), which other load on the machine disturbs far less; `x tutorial`
    and `x img2dataset` compare throughput (None when that row was not run)."""
    for row in rows:
        images = max(row["images"], 1)
        row["rate"] = row["images"] / row["wall"]
        row["cpu_per_image"] = row["cpu"] / images
        row["server_ms_per_image"] = 1000 * row.get("server_cpu", 0.0) / images
        row["vs_ceiling"] = row["rate"] / ceiling
        row["vs_ceiling_cpu"] = ceiling_cpu / row.get("steady_cpu_per_image", row["cpu_per_image"])
        row["vs_tutorial"] = row["rate"] / tutorial if tutorial else None
        row["vs_img2dataset"] = row["rate"] / img2dataset if img2dataset else None


def _cells(row: dict[str, Any]) -> list[Any]:
    steady = f"{row['steady_rate']:.1f}" if row.get("steady_rate") else "-"
    steady_cpu = row.get("steady_cpu_per_image")
    return [
        row["label"],
        row["rate"],
        steady,
        1000 * row["cpu_per_image"],
        f"{1000 * steady_cpu:.2f}" if steady_cpu else "-",
        row["server_ms_per_image"],
        row["client_rss"] / MIB,
        row["tree_rss"] / MIB,
        row["vs_ceiling"],
        row["vs_ceiling_cpu"],
        row["vs_tutorial"] or 0.0,
        f"{row['vs_img2dataset']:.2f}" if row.get("vs_img2dataset") else "",
    ]


def table(
    rows: list[dict[str, Any]],
    columns: Sequence[tuple[str, str]] = COLUMNS,
    cells: Callable[[dict[str, Any]], list[Any]] = _cells,
) -> str:
    """A fixed-width text table, also valid Markdown: `columns` are (name, format) pairs,
    `cells(row)` a row's values in their order."""
    header = "| " + " | ".join(name for name, _ in columns) + " |"
    rule = "|" + "|".join("-" * (len(name) + 2) for name, _ in columns) + "|"
    lines = [header, rule]
    for row in rows:
        values = zip(columns, cells(row), strict=True)
        cells_text = [fmt.format(value) for (_, fmt), value in values]
        lines.append("| " + " | ".join(cells_text) + " |")
    return "\n".join(lines)


def write_json(path: Path, meta: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    path.write_text(json.dumps({**meta, "rows": rows}, indent=2, sort_keys=True) + "\n")


def chart(path: Path, title: str, rows: list[dict[str, Any]], ceiling: float) -> None:
    """Horizontal bars of images/s, with the CPU ceiling as a vertical line."""
    font = ImageFont.load_default(size=14)
    label_width, bar_width, row_height, top = 300, 520, 26, 40
    width = label_width + bar_width + 90
    height = top + row_height * len(rows) + 20
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((10, 10), title, fill="black", font=font)
    scale = bar_width / max(max(row["rate"] for row in rows), ceiling)
    for position, row in enumerate(rows):
        y = top + position * row_height
        colour = "#4c72b0" if row["kind"] == "pipeline" else "#999999"
        draw.text((10, y + 4), row["label"], fill="black", font=font)
        draw.rectangle(
            (label_width, y + 3, label_width + row["rate"] * scale, y + row_height - 3), colour
        )
        text = f"{row['rate']:.0f}/s  {row['vs_ceiling']:.2f}x"
        draw.text((label_width + row["rate"] * scale + 5, y + 4), text, fill="black", font=font)
    x = label_width + ceiling * scale
    draw.line((x, top - 5, x, height - 10), fill="#c44e52", width=2)
    image.save(path)
