"""Contact sheets: real vs synthetic images of one class side by side (the paper's Fig. 3).

Left panel: real images of the fold's TRAIN part that hold the class (what the adapter saw);
right panel: kept synthetic images of that class. Both panels are grids of equal thumbnails,
picked deterministically (by image id / plan order), so the sheet of a rerun is identical.
"""

from __future__ import annotations

import io
import math

from PIL import Image, ImageDraw, ImageFont

PAD = 4
TITLE = 18


def _grid(images: list[Image.Image], cols: int, rows: int, thumb: int) -> Image.Image:
    panel = Image.new("L", (cols * thumb + (cols + 1) * PAD, rows * thumb + (rows + 1) * PAD), 32)
    for i, image in enumerate(images[: cols * rows]):
        tile = image.convert("L")
        tile.thumbnail((thumb, thumb))
        r, c = divmod(i, cols)
        x = PAD + c * (thumb + PAD) + (thumb - tile.width) // 2
        y = PAD + r * (thumb + PAD) + (thumb - tile.height) // 2
        panel.paste(tile, (x, y))
    return panel


def contact_sheet(real: list[Image.Image], synthetic: list[Image.Image], class_name: str, fold: int,
                  per_side: int = 8, thumb: int = 128) -> bytes:
    """PNG bytes of the sheet; a side with no image says so instead of being silently empty."""
    real, synthetic = real[:per_side], synthetic[:per_side]
    cols = max(1, math.ceil(math.sqrt(per_side)))
    rows = max(1, math.ceil(per_side / cols))
    font = ImageFont.load_default()  # bundled with Pillow: nothing to download
    titles = (f"real ({len(real)} shown)" if real else "real: none in this fold's train part",
              f"synthetic, kept ({len(synthetic)} shown)" if synthetic else "synthetic: none kept")
    footer = f"{class_name} - fold {fold}"
    measure = ImageDraw.Draw(Image.new("L", (1, 1)))
    panels = []
    for images, title in zip((real, synthetic), titles):
        grid = _grid(images, cols, rows, thumb)
        width = max(grid.width, int(measure.textlength(title, font=font)) + 2 * PAD)
        panel = Image.new("L", (width, grid.height), 255)
        panel.paste(grid, ((width - grid.width) // 2, 0))
        panels.append(panel)
    left, right = panels
    width = max(left.width + right.width + PAD, int(measure.textlength(footer, font=font)) + 2 * PAD)
    sheet = Image.new("L", (width, left.height + 2 * TITLE), 255)
    sheet.paste(left, (0, TITLE))
    sheet.paste(right, (left.width + PAD, TITLE))
    draw = ImageDraw.Draw(sheet)
    draw.text((PAD, 3), titles[0], fill=0, font=font)
    draw.text((left.width + 2 * PAD, 3), titles[1], fill=0, font=font)
    draw.text((PAD, sheet.height - TITLE + 3), footer, fill=0, font=font)
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    return buffer.getvalue()
