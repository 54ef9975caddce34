"""The whole chain under Snakemake on a tiny demo country (2 tiles), as a user runs it."""

from __future__ import annotations

import csv
import html
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import geopandas as gpd
import numpy as np
import pystac
import pytest
import rasterio
import yaml

from pipeline.config import load_config
from pipeline.layout import Layout
from pipeline.models import NETWORKS, derive_seed
from pipeline.report import build_report
from tests.conftest import REPO, tiny_demo_config
from tests.report_page import check_page, parse, table

pytestmark = pytest.mark.e2e


def _snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile")]
    cmd += ["--directory", str(workdir), "--cores", "2", *args]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("e2e")
    raw = tiny_demo_config()
    raw["qa"]["references"] = 3
    # every network of the family through the same targets as RF, small enough for CI
    raw["classifiers"] = ["rf", *NETWORKS]
    raw["nets"].update(
        unet_filters=[8, 16, 32], mlp_filters=[32, 16, 16], lstm_hidden=16, patch_size=32,
        batch_size=4, epochs=2, steps_per_epoch=6, warmup_epochs=1, selection_patches=8,
        head_refit=False,  # refused with lstm3 and tsfgunet (no linear last layer); tests/test_headfit.py
    )  # fmt: skip
    (work / "config.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    proc = _snakemake(work)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return work


def test_maps_validity_and_metrics(run):
    cfg = load_config(run / "config.yaml")
    lay = Layout(run / cfg.workdir)
    for tile in cfg.tiles:
        with rasterio.open(lay.class_map("rf", tile)) as src:
            assert src.dtypes[0] == "uint8" and src.nodata == 0
            assert src.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
            cmap = src.colormap(1)
            for c in cfg.classes:
                assert cmap[c.code][:3] == c.rgb
            data = src.read(1)
            assert set(np.unique(data)) <= {0, *cfg.class_codes.tolist()}
            assert len(np.unique(data)) >= 5
        with rasterio.open(lay.validity(tile)) as src:
            assert src.read(1).max() > 0
    overall = json.loads(lay.overall_metrics("rf").read_text())
    chance_oa = 1 / len(cfg.classes)
    assert overall["kappa"] > 0.5, overall["kappa"]  # well above chance (kappa 0)
    assert overall["oa"] > 3 * chance_oa


def test_networks_map_every_tile_and_are_compared(run):
    cfg = load_config(run / "config.yaml")
    lay = Layout(run / cfg.workdir)
    for name in cfg["classifiers"]:
        for tile in cfg.tiles:
            with (
                rasterio.open(lay.class_map(name, tile)) as m,
                rasterio.open(lay.confidence(name, tile)) as c,
            ):
                codes, conf = m.read(1), c.read(1)
                assert m.tags()["MODEL"] == name
                assert c.nodata == 255 and c.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
            assert set(np.unique(codes)) <= {0, *cfg.class_codes.tolist()}
            assert ((conf == 255) == (codes == 0)).all()  # confidence exactly where there is a class
            assert conf[codes > 0].max() <= 100
        doc = json.loads(lay.overall_metrics(name).read_text())
        assert doc["model"] == name and doc["n_pixels"] > 0
    table = lay.comparison("md").read_text()
    header = next(line for line in table.splitlines() if line.startswith("| classifier"))
    rows = [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ")]
    assert set(cfg["classifiers"]) <= set(rows), table
    assert "kappa T31TCJ" in header
    csv_head = lay.comparison("csv").read_text().splitlines()[0]
    assert csv_head.startswith("classifier,OA,kappa")
    # the training curves exist for every network
    for name in NETWORKS:
        assert (lay.model_dir(name) / "training.png").stat().st_size > 0


def test_geometric_qa_per_tile(run):
    cfg = load_config(run / "config.yaml")
    lay = Layout(run / cfg.workdir)
    for tile in cfg.tiles:
        doc = json.loads(lay.qa(tile).read_text())
        assert len(doc["references"]) == 3 and all(r["corners"] > 0 for r in doc["references"])
        rr = doc["reference_vs_reference"]
        assert 0 < rr["mean"] <= 1 and len(rr["pairs"]) == 6
        assert set(doc["models"]) == set(cfg["classifiers"])
        for m in doc["models"].values():
            assert m["mean"] is None or 0 <= m["mean"] <= 1


# the browser of the report test: started with exactly these flags (and per-use output flags)
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--no-first-run",
]
ARTIFACTS = REPO / "test-artifacts"

# appended to a copy of the report: after `load`, record which images the browser could not decode
IMAGE_PROBE = """<script>
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  const broken = images.filter((i) => !(i.complete && i.naturalWidth > 0)).map((i) => i.alt);
  const out = document.createElement("pre");
  out.id = "image-probe";
  out.textContent = JSON.stringify({total: images.length, broken: broken});
  document.body.appendChild(out);
});
</script>"""


def _chromium() -> str:
    exe = shutil.which("chromium")
    if exe is None:
        if os.environ.get("LANDCOVER_REQUIRE_CHROMIUM") == "1":
            pytest.fail("LANDCOVER_REQUIRE_CHROMIUM=1 but no chromium on PATH (apt-get install chromium)")
        pytest.skip("chromium is not installed (Debian: apt-get install chromium)")
    return exe


def _browse(chromium: str, home: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HOME": str(home)}  # the browser's profile and caches stay in the test's folder
    return subprocess.run(
        [chromium, *CHROMIUM_FLAGS, *args], capture_output=True, text=True, timeout=180, env=env
    )


def test_the_national_mosaic_holds_every_place_once(run):
    """Each classifier's mosaic against an independent reassembly of its tile maps: every pixel
    from the nearest tile centre that has data; areas counted once; the report shows them."""
    cfg = load_config(run / "config.yaml")
    lay = Layout(run / cfg.workdir)
    page = parse(lay.report().read_text())
    national = table(page, "areas", "national")
    for m in cfg["classifiers"]:
        with rasterio.open(lay.mosaic(m)) as src:
            mosaic, tr = src.read(1), src.transform
            assert src.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG" and src.nodata == 0
            assert src.colormap(1)[cfg.classes[0].code][:3] == cfg.classes[0].rgb
        expect = np.zeros_like(mosaic)
        best = np.full(mosaic.shape, np.inf)
        rows, cols = np.mgrid[0 : mosaic.shape[0], 0 : mosaic.shape[1]]
        for t in cfg.tiles:
            with rasterio.open(lay.class_map(m, t)) as src:
                tile, ttr = src.read(1), src.transform
            r0, c0 = round((tr.f - ttr.f) / tr.a), round((ttr.c - tr.c) / tr.a)
            h, w = tile.shape
            cy, cx = r0 + h / 2, c0 + w / 2
            d = (rows + 0.5 - cy) ** 2 + (cols + 0.5 - cx) ** 2
            inside = (rows >= r0) & (rows < r0 + h) & (cols >= c0) & (cols < c0 + w)
            vals = np.zeros_like(mosaic)
            vals[inside] = tile[(rows - r0)[inside], (cols - c0)[inside]]
            take = inside & (vals > 0) & (d < best)
            expect[take], best[take] = vals[take], d[take]
        np.testing.assert_array_equal(mosaic, expect)
        summary = json.loads(lay.mosaic(m, "summary").read_text())
        tile_px = 0
        for t in cfg.tiles:
            with rasterio.open(lay.class_map(m, t)) as src:
                tile_px += int((src.read(1) > 0).sum())
        assert summary["mapped_pixels"] == int((mosaic > 0).sum()) < tile_px  # the overlap once
        header = national["head"][0]
        col = header.index(f"{m} (ha)")
        total = float(national["rows"][-1][col].replace(",", "").split()[0])
        assert total == pytest.approx(summary["mapped_area_ha"], rel=0.01)
        # the regions' areas add up to the nation's, and the vector product covers every mapped pixel
        regions = list(csv.DictReader(lay.mosaic(m, "regions").open()))
        assert sum(float(r["area_ha"]) for r in regions) == pytest.approx(summary["mapped_area_ha"], rel=1e-6)
        index = json.loads((lay.vector_dir(m) / "index.json").read_text())
        polygons = [gpd.read_file(lay.vector_dir(m) / p["file"]) for p in index["parts"]]
        assert sum(int(p.pixels.sum()) for p in polygons) == summary["mapped_pixels"]
    assert table(page, "regions")["rows"]
    # the STAC catalogue: an item per tile and the national one, every asset on disk
    collection = pystac.Collection.from_file(str(lay.catalogue()))
    items = list(collection.get_items())
    assert sorted(i.id for i in items) == sorted(["national", *(f"tile-{t}" for t in cfg.tiles)])
    assert all(os.path.exists(a.get_absolute_href()) for i in items for a in i.assets.values())


@pytest.fixture(scope="module")
def two_zones(tmp_path_factory) -> Path:
    """The tiny demo with its western tile in UTM zone 30 (its products on a zone-30 grid), RF only,
    mosaicked in zone 31: a national run across a zone border."""
    work = tmp_path_factory.mktemp("zones")
    raw = tiny_demo_config()
    raw["demo"]["tiles"] = [{"name": "T30TYP", "format": "theia", "epsg": 32630}, {"name": "T31TDJ"}]
    raw["inputs"]["tiles"] = {t: {"format": "theia", "path": f"inputs/{t}"} for t in ("T30TYP", "T31TDJ")}
    raw["classifiers"] = ["rf"]
    raw["qa"]["references"] = 2
    raw["mosaic"] = {"crs": "EPSG:32631"}
    (work / "config.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    proc = _snakemake(work)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return work


def test_a_country_across_two_utm_zones_is_one_map(two_zones):
    cfg = load_config(two_zones / "config.yaml")
    lay = Layout(two_zones / cfg.workdir)
    with rasterio.open(lay.class_map("rf", "T30TYP")) as src:
        assert src.crs.to_epsg() == 32630  # the zone-30 tile is mapped on its own grid
    summary = json.loads(lay.mosaic("rf", "summary").read_text())
    assert summary["crs"] == "EPSG:32631" and summary["reprojected"] == ["T30TYP"]
    # both tiles are mapped well; the zone-30 one somewhat less (0.69 against 0.79 for the same
    # western tile rendered in zone 31, on this CPU): the demo resamples its pixel-scale textures
    # (vineyard rows, urban blocks) onto the rotated grid, which a real zone-30 acquisition does not
    # (docs/mosaic.md)
    overall = json.loads(lay.overall_metrics("rf").read_text())
    assert overall["tiles"]["T30TYP"]["kappa"] > 0.6 and overall["tiles"]["T31TDJ"]["kappa"] > 0.75
    # in the overlap both tiles map the same land: the zone-30 map, warped into zone 31, agrees with
    # the zone-31 map where both have data
    from rasterio.vrt import WarpedVRT

    east_map, west_map = lay.class_map("rf", "T31TDJ"), lay.class_map("rf", "T30TYP")
    with rasterio.open(east_map) as east, rasterio.open(west_map) as west:
        grid = {"crs": east.crs, "transform": east.transform, "width": east.width, "height": east.height}
        with WarpedVRT(west, **grid) as warped:  # noqa: SIM117 (east's grid is needed first)
            a, b = warped.read(1), east.read(1)
    both = (a > 0) & (b > 0)
    assert both.sum() > 500 and (a[both] == b[both]).mean() > 0.8
    # the mosaic holds both tiles, every place once; the catalogue has both tiles and the nation
    with rasterio.open(lay.mosaic("rf")) as src:
        mosaic = src.read(1)
    assert summary["mapped_pixels"] == int((mosaic > 0).sum())
    collection = pystac.Collection.from_file(str(lay.catalogue()))
    assert sorted(i.id for i in collection.get_items()) == ["national", "tile-T30TYP", "tile-T31TDJ"]


def test_qa_report_opens_in_a_headless_browser(run, tmp_path):
    """The demo run's report: self-contained, every table with its classifiers and classes, every
    image decoded by a real browser, stage times recorded; a screenshot kept in test-artifacts/."""
    chromium = _chromium()
    cfg = load_config(run / "config.yaml")
    lay = Layout(run / cfg.workdir)
    report = lay.report()
    text = report.read_text()
    names = [c.name for c in cfg.classes]
    page = check_page(text, cfg["classifiers"], names, cfg.tiles)
    assert {f"tile-{t.lower()}" for t in cfg.tiles} <= page.ids
    assert {"rf", "fgunet"} <= {r[0] for r in table(page, "qa", cfg.tiles[0])["rows"]}
    rules = {r[0] for r in table(page, "benchmarks")["rows"]}
    assert {"ingest", "gapfill", "train", "predict", "validate", "qa"} <= rules, rules
    products = table(page, "products")["rows"]
    assert products and products[0][2] in ("SENTINEL2A", "SENTINEL2B")  # platform from the ingest store

    probe = tmp_path / "probe.html"
    probe.write_text(text.replace("</body>", IMAGE_PROBE + "</body>"))
    proc = _browse(chromium, tmp_path, "--dump-dom", "--virtual-time-budget=20000", probe.as_uri())
    found = re.search(r'<pre id="image-probe">(.*?)</pre>', proc.stdout, re.S)
    assert found, proc.stderr[-3000:]
    assert json.loads(html.unescape(found.group(1))) == {"total": len(page.images), "broken": []}

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "report.png"
    shot.unlink(missing_ok=True)
    proc = _browse(chromium, tmp_path, f"--screenshot={shot}", "--window-size=1280,4000", report.as_uri())
    assert shot.exists() and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", proc.stderr[-3000:]
    print(f"QA report screenshot: {shot} ({report.stat().st_size / 1e6:.1f} MB report)")


def test_snakemake_report_bundles_the_qa_report(run, tmp_path):
    out = tmp_path / "snakemake-report.zip"
    proc = _snakemake(run, "--report", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = {Path(n).name for n in zipfile.ZipFile(out).namelist()}
    assert {"report.html", "qa_report.html", "comparison.csv", "T31TCJ.json", "T31TDJ.json"} <= names, names


def test_an_extra_seed_is_trained_mapped_and_reported(run, tmp_path, monkeypatch):
    """run.seeds [42, 43] with RF: Snakemake trains rf-s43 with seed 43 (only that model's chain is
    built), and the report shows kappa mean +- std over the two seeds."""
    raw = yaml.safe_load((run / "config.yaml").read_text())
    raw["run"]["seeds"] = [raw["run"]["seed"], 43]
    raw["classifiers"] = ["rf"]
    seeds_cfg = run / "config-seeds.yaml"
    seeds_cfg.write_text(yaml.safe_dump(raw, sort_keys=False))
    target = "results/metrics/rf-s43/overall.json"
    proc = _snakemake(run, target, "--configfile", str(seeds_cfg))  # --configfile takes several
    assert proc.returncode == 0, proc.stderr[-3000:]
    rules = re.findall(r"^(?:local)?rule (\w+):", proc.stdout + proc.stderr, re.M)
    assert sorted(rules) == ["predict", "predict", "summarise", "train", "validate", "validate"], rules
    cfg = load_config(seeds_cfg)
    lay = Layout(run / cfg.workdir)
    meta = json.loads(lay.model_meta("rf-s43").read_text())
    assert meta["samples"]["seed"] == derive_seed(43, "sampling") != derive_seed(cfg.seed, "sampling")
    monkeypatch.chdir(run)  # the config's workdir is relative to the run folder
    page = parse(build_report(cfg, tmp_path / "seeds.html").read_text())
    kappas = [json.loads(lay.overall_metrics(m).read_text())["kappa"] for m in ("rf", "rf-s43")]
    row = table(page, "seeds")["rows"][0]
    assert row[:4] == ["rf", "2", f"{np.mean(kappas):.3f}", f"{np.std(kappas, ddof=1):.3f}"]


def test_one_tile_target_rebuilds_only_that_tile(run):
    cfg = load_config(run / "config.yaml")
    lay = Layout(run / cfg.workdir)
    first, second = cfg.tiles[:2]
    target = lay.class_map("rf", first)
    other_mtime = lay.class_map("rf", second).stat().st_mtime_ns
    target.unlink()
    proc = _snakemake(run, str(target.relative_to(run)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert "rule predict" in log and log.count("rule ") == 1, log[-3000:]
    assert target.exists()
    assert lay.class_map("rf", second).stat().st_mtime_ns == other_mtime


# --- config changes: exactly the jobs that read the changed setting, and a dry run writes nothing ---


def _jobs(proc: subprocess.CompletedProcess) -> list[str]:
    """``rule[wildcards]`` of every job a Snakemake run lists, sorted."""
    out, rule = [], None
    for line in (proc.stdout + proc.stderr).splitlines():
        if m := re.match(r"^(?:local)?rule (\w+):", line):
            rule = m.group(1)
            if rule == "all":
                rule = None
        elif rule and (m := re.match(r"^\s+wildcards: (.*)", line)):
            out.append(f"{rule}[{m.group(1)}]")
            rule = None
    # rules without wildcards (compare, report, percentiles, split) show none
    text = proc.stdout + proc.stderr
    out += [
        r
        for r in re.findall(r"^(?:local)?rule (\w+):", text, re.M)
        if r in {"compare", "report", "catalogue"}
    ]
    return sorted(out)


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under the run (Snakemake's own folder aside) with its size and mtime."""
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in root.rglob("*")
        if p.is_file() and ".snakemake" not in p.parts
    }


def _with_change(run: Path, path: str, value, out: Path) -> Path:
    """The run's config with one setting changed, written to ``out`` (outside the run)."""
    raw = yaml.safe_load((run / "config.yaml").read_text())
    node = raw
    *parents, last = path.split(".")
    for p in parents:
        node = node[p]
    node[last] = value
    out.write_text(yaml.safe_dump(raw, sort_keys=False))
    return out


def test_an_unchanged_config_has_nothing_to_do(run):
    proc = _snakemake(run, "-n")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Nothing to be done" in proc.stdout + proc.stderr


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        # by hand, for the fixture's run (rf + 5 networks, 2 tiles, 3 QA reference RFs)
        ("nets.epochs", 3, ["train", "predict", "validate", "summarise"]),  # x each network, below
        ("inference.overlap", 24, ["predict", "validate", "summarise"]),
        ("qa.corner_distance", 4, []),
    ],
)
def test_a_dry_run_lists_exactly_the_jobs_a_change_affects_and_writes_nothing(
    run, tmp_path, path, value, expected
):
    cfg = load_config(run / "config.yaml")
    tiles, networks = cfg.tiles, [m for m in cfg["classifiers"] if m != "rf"]
    want = []
    for rule in expected:
        for net in networks:
            if rule == "train" or rule == "summarise":
                want.append(f"{rule}[model={net}]")
            else:
                want += [f"{rule}[model={net}, tile={t}]" for t in tiles]
            if rule == "predict":  # new tile maps: a new national mosaic of that network, and its products
                want += [f"{r}[model={net}]" for r in ("mosaic", "regions", "vector")]
    want += [f"qa[tile={t}]" for t in tiles] + ["report", "catalogue"] + (["compare"] if expected else [])
    before = _snapshot(run)
    changed = _with_change(run, path, value, tmp_path / "changed.yaml")
    proc = _snakemake(run, "-n", "--configfile", str(changed))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _jobs(proc) == sorted(want)
    assert _snapshot(run) == before, "a dry run wrote to the run"


def test_a_changed_setting_reruns_its_jobs_under_a_new_frozen_config(run, tmp_path):
    """A real run after qa.corner_distance changed: only the QA, the report and the catalogue are
    remade, they record the new config's digest, and that config is frozen under it; the rest stays
    as it was."""
    work = tmp_path / "copy"
    shutil.copytree(run, work, symlinks=True)  # keeps mtimes and Snakemake's records
    cfg = load_config(work / "config.yaml")
    lay = Layout(work / cfg.workdir)
    before = _snapshot(work)
    changed = _with_change(work, "qa.corner_distance", 4, tmp_path / "changed.yaml")
    proc = _snakemake(work, "--configfile", str(changed))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _jobs(proc) == sorted([f"qa[tile={t}]" for t in cfg.tiles] + ["report", "catalogue"])
    new = load_config(lay.run_config())
    assert new["qa"]["corner_distance"] == 4 and new.digest != cfg.digest
    assert lay.frozen_config(new.digest).read_text() == lay.run_config().read_text()
    assert lay.frozen_config(cfg.digest).exists()  # the config the other outputs were made with
    for tile in cfg.tiles:
        assert json.loads(lay.qa(tile).read_text())["config_digest"] == new.digest
    after = _snapshot(work)
    remade = {k for k in before.keys() & after.keys() if before[k] != after[k]}
    assert all(k.startswith(("results/qa/", "results/report/", "results/logs/qa", "results/logs/report",
                             "results/benchmarks/qa", "results/benchmarks/report", "results/run-config",
                             "results/catalog/", "results/logs/catalogue", "results/benchmarks/catalogue"))
               for k in remade), sorted(remade)  # fmt: skip
    assert "Nothing to be done" in _snakemake(work, "-n", "--configfile", str(changed)).stdout


def test_a_failed_retrain_keeps_the_last_good_model_and_its_maps(run, tmp_path):
    """A network setting changes, and the retrain fails (here: next year's starting model,
    nets.init_from, is an MLP-3, refused for an FG-UNET). The model folder and the maps made from
    it stay as they were; only the receipt Snakemake tracks is gone, so the next run trains again."""
    work = tmp_path / "copy"
    shutil.copytree(run, work, symlinks=True)
    cfg = load_config(work / "config.yaml")
    lay = Layout(work / cfg.workdir)
    before = _snapshot(work)
    wrong = {"fgunet": str(lay.model_dir("mlp3"))}
    changed = _with_change(work, "nets.init_from", wrong, tmp_path / "changed.yaml")
    receipt = lay.model_receipt("fgunet")
    target = str(receipt.relative_to(work))  # before --configfile, which takes every file after it
    proc = _snakemake(work, target, "--configfile", str(changed))
    assert proc.returncode != 0
    log = (lay.workdir / "logs" / "train_fgunet.log").read_text()
    assert "it is a mlp3, this run trains a fgunet" in log, log[-2000:]
    after = _snapshot(work)
    kept = [k for k in before if k.startswith(("results/models/fgunet/", "results/maps/fgunet/"))]
    assert kept and all(after.get(k) == before[k] for k in kept)  # same bytes, untouched
    assert not receipt.exists()
    assert not [p for p in lay.model_dir("fgunet").parent.iterdir() if p.name.startswith(".")]
    again = _snakemake(work, target, "-n", "--configfile", str(changed))
    assert _jobs(again) == ["train[model=fgunet]"]
    assert "Missing output files" in again.stdout + again.stderr
