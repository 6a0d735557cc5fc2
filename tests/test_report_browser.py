"""The HTML report in a real browser: headless Chromium (the distribution's package) renders index.html.

`.ci/run` installs Chromium, so CI always runs this test (it fails there when the browser is missing);
elsewhere it skips with the reason. The page is loaded at 1280 px with a probe script appended (a copy of
the page; the report itself is untouched) that reports, into the dumped DOM, what a reader would see:
the page width, every figure decoded and not blank, the tables and the highlighted best cells, and that
clicking a header sorts its table. A screenshot checks that pixels are drawn.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from t2id import layout
from t2id.store import open_store
from test_report import _fill_run, _run_report

BROWSERS = ("chromium", "chromium-browser", "chromium-headless-shell", "google-chrome")
WIDTH = 1280

PROBE = """<script>
window.addEventListener("load", function () {
  var figures = Array.prototype.map.call(document.images, function (img) {
    var canvas = document.createElement("canvas");
    canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
    var distinct = 0;
    if (img.naturalWidth > 0) {
      var ctx = canvas.getContext("2d"); ctx.drawImage(img, 0, 0);
      var data = ctx.getImageData(0, 0, canvas.width, canvas.height).data, seen = {};
      for (var i = 0; i < data.length && distinct < 50; i += 4 * 7) {
        var key = data[i] + "," + data[i + 1] + "," + data[i + 2];
        if (!seen[key]) { seen[key] = 1; distinct++; }
      }
    }
    return {alt: img.alt, width: img.naturalWidth, shown: img.getBoundingClientRect().width, distinct: distinct};
  });
  var table = document.querySelector("table.sortable"), column = 1;
  var values = function () {
    return Array.prototype.map.call(table.tBodies[0].rows, function (r) { return r.cells[column].textContent; });
  };
  var before = values();
  table.tHead.rows[0].cells[column].click();
  var sorted = values();
  var out = document.createElement("pre");
  out.id = "probe";
  out.textContent = JSON.stringify({
    scrollWidth: document.documentElement.scrollWidth, innerWidth: window.innerWidth,
    figures: figures, tables: document.querySelectorAll("table").length,
    best: document.querySelectorAll("td.best").length, before: before, sorted: sorted,
    tableRight: Math.max.apply(null, Array.prototype.map.call(document.querySelectorAll(".scroll"),
      function (d) { return d.getBoundingClientRect().right; }))
  });
  document.body.appendChild(out);
});
</script>"""


@pytest.fixture
def browser() -> str:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    if os.environ.get("CI"):
        pytest.fail(f"CI runs the browser test: .ci/run installs Chromium, but none of {BROWSERS} is on PATH")
    pytest.skip(f"no headless Chromium here (none of {BROWSERS} on PATH; `apt-get install chromium`); "
                "CI installs it and always runs this test")


def headless(browser: str, *args: str) -> subprocess.CompletedProcess:
    # --no-sandbox: CI containers run as root, where Chromium's sandbox refuses to start.
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--allow-file-access-from-files",
           f"--window-size={WIDTH},1000", "--virtual-time-budget=10000", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


def leading(text: str) -> float:
    match = re.match(r"\s*([+-]?\d+(?:\.\d+)?)", text)
    return float(match.group(1)) if match else float("nan")


def test_report_renders_in_a_real_browser(browser, tmp_path):
    store = open_store(str(tmp_path / "store"))
    _fill_run(store)
    _run_report(store, tmp_path)
    page = store.read_text(layout.report.index_html)
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("</body>", PROBE + "</body>"))

    dumped = headless(browser, "--dump-dom", probe.as_uri())
    found = re.search(r'<pre id="probe">(.*?)</pre>', dumped.stdout, re.S)
    assert found, f"the probe did not run: rc={dumped.returncode} stderr={dumped.stderr[-2000:]}"
    seen = json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<")
                      .replace("&gt;", ">"))

    # No layout overflow at 1280 px: wide tables scroll inside their own box.
    assert seen["innerWidth"] == WIDTH and seen["scrollWidth"] <= WIDTH, seen
    assert seen["tableRight"] <= WIDTH
    # Every figure decoded, drawn on the page, and not blank.
    assert len(seen["figures"]) >= 5
    for figure in seen["figures"]:
        assert figure["width"] > 0 and figure["shown"] > 0, figure
        assert figure["distinct"] >= 3, f"figure looks blank: {figure}"
    # The tables are there, the best strategy per class is highlighted, and a header click sorts.
    assert seen["tables"] >= 5 and seen["best"] >= 1
    numbers = [leading(v) for v in seen["sorted"]]
    assert numbers == sorted(numbers) and sorted(seen["before"]) == sorted(seen["sorted"])

    original, shot = tmp_path / "index.html", tmp_path / "shot.png"
    original.write_text(page)
    done = headless(browser, f"--screenshot={shot}", original.as_uri())
    assert shot.exists(), done.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("L"))
    assert pixels.shape[1] == WIDTH
    assert (pixels < 128).mean() > 0.005 and pixels.std() > 10  # text, table rules and figures were drawn
