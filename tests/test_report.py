"""The QA report (pipeline/report): hand-checked figures on tiny runs built on the fly, bad input, and
the multi-seed wiring. The report of the real demo run, opened in a browser, is in tests/test_e2e.py."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from html import escape
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import yaml
import zarr
from affine import Affine
from rasterio.crs import CRS
from rasterio.windows import Window
from shapely.geometry import box

from pipeline.cli import main
from pipeline.config import Config, load_config
from pipeline.errors import PipelineError
from pipeline.io.cog import CONFIDENCE_NODATA, cog_writer, confidence_writer, margin_writer, write_class_map
from pipeline.io.tilestore import Grid, add_array, create_store, iter_windows, win_slices
from pipeline.layout import Layout
from pipeline.metrics import NO_VALIDATION, UNMAPPED, summarise, validate_tile
from pipeline.models import derive_seed
from pipeline.qa import tile_qa
from pipeline.reference import rasterise_tile
from pipeline.report import build_report, collect, figures, provenance, rasters, tables
from tests.conftest import REPO, make_grid
from tests.report_page import check_page, parse, table

H, W = 96, 128


# ------------------------------------------------------------------------------------ fixtures


def write_raster(path: Path, grid: Grid, data: np.ndarray, kind: str) -> Path:
    """A confidence ("confidence") or validity ("validity") COG of ``data``, as the stages write them."""
    if kind == "confidence":
        ctx = confidence_writer(path, grid)
    else:
        ctx = cog_writer(path, grid, "uint16", nodata=None, resampling="AVERAGE")
    with ctx as sink:
        for win in iter_windows(grid.height, grid.width, 512):
            sink.write(win, data[win_slices(win)].astype("uint8" if kind == "confidence" else "uint16"))
    return path


def write_labels(path: Path, grid: Grid, truth: np.ndarray, tile: str) -> Path:
    g = create_store(path, "reference", grid, tile=tile)
    add_array(g, "train", truth.shape, "uint8", 0)
    add_array(g, "validation", truth.shape, "uint8", 0)[:] = truth
    return path


def make_config(tmp_path: Path, **run: object) -> Config:
    raw = yaml.safe_load((REPO / "config.yaml").read_text())
    raw["run"]["workdir"] = str(tmp_path / "run")
    raw["run"].update(run)
    raw["classifiers"] = ["rf", "fgunet"]
    raw["qa"]["references"] = 2
    raw["report"] = {"crops": 2, "crop_size": 32}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return load_config(path)


@pytest.fixture
def tiny_run(tmp_path) -> Config:
    """Two tiles, rf and fgunet maps with confidence, validity layers, metrics; T31TDJ has no
    validation polygon and no QA file; fgunet has no confidence layer on T31TDJ."""
    cfg = make_config(tmp_path)
    lay = Layout(cfg.workdir)
    codes = cfg.class_codes
    grid = make_grid(W, H)
    truth = np.zeros((H, W), np.uint8)
    truth[10:40, 10:60] = codes[0]
    truth[50:90, 70:120] = codes[4]
    base = np.full((H, W), codes[9], np.uint8)
    base[5:45, 5:65] = codes[0]
    base[48:92, 66:124] = codes[4]
    rf = base.copy()
    fg = base.copy()
    fg[50:70, 70:90] = codes[9]  # fgunet misses part of the crop field: the place they disagree
    for tile in cfg.tiles:
        for name, m in (("rf", rf), ("fgunet", fg)):
            write_class_map(lay.class_map(name, tile), grid, cfg.classes, m)
            if not (name == "fgunet" and tile == "T31TDJ"):
                write_raster(lay.confidence(name, tile), grid, np.full((H, W), 80, np.uint8), "confidence")
        write_raster(lay.validity(tile), grid, np.full((H, W), 12), "validity")
        labels = write_labels(
            tmp_path / f"{tile}.zarr", grid, truth if tile == "T31TCJ" else np.zeros_like(truth), tile
        )
        for name in ("rf", "fgunet"):
            validate_tile(cfg, lay.class_map(name, tile), labels, lay.metrics(name, tile))
    for name in ("rf", "fgunet"):
        summarise(cfg, [lay.metrics(name, t) for t in cfg.tiles], lay.overall_metrics(name), model=name)
    maps = {m: lay.class_map(m, "T31TCJ") for m in ("rf", "fgunet")}
    tile_qa(maps, [lay.class_map("rf", "T31TCJ")] * 2, lay.qa("T31TCJ"), tile="T31TCJ")
    return cfg


# ------------------------------------------------------------------------- hand-checked figures


def test_class_areas_are_hectares_of_the_maps_own_pixel_size(tmp_path):
    cfg = load_config(REPO / "config.yaml")
    codes = cfg.class_codes
    m = np.zeros((H, W), np.uint8)
    m[:10, :30] = codes[0]  # 300 px
    m[20:70, :] = codes[3]  # 50 x 128 = 6400 px
    write_class_map(tmp_path / "10m.tif", make_grid(W, H), cfg.classes, m)
    c = rasters.value_counts(tmp_path / "10m.tif")
    assert c.pixel_area_m2 == 100.0
    ha = c.hectares(codes.tolist())
    assert ha[0] == pytest.approx(3.0) and ha[3] == pytest.approx(64.0)  # 10 m pixel = 0.01 ha
    assert ha.sum() == pytest.approx(67.0)
    grid20 = Grid(CRS.from_epsg(32631), Affine(20.0, 0.0, 399960.0, 0.0, -20.0, 4800000.0), W, H)
    write_class_map(tmp_path / "20m.tif", grid20, cfg.classes, m)
    assert rasters.value_counts(tmp_path / "20m.tif").hectares(codes.tolist())[0] == pytest.approx(12.0)


def test_areas_refuse_a_geographic_crs(tmp_path):
    cfg = load_config(REPO / "config.yaml")
    wgs84 = Grid(CRS.from_epsg(4326), Affine(0.0001, 0.0, 1.0, 0.0, -0.0001, 43.0), 20, 10)
    write_class_map(tmp_path / "ll.tif", wgs84, cfg.classes, np.full((10, 20), cfg.class_codes[0], np.uint8))
    with pytest.raises(PipelineError, match="projected CRS"):
        rasters.value_counts(tmp_path / "ll.tif")


def test_confusion_percent_rows_sum_to_100():
    cm = np.array([[40, 10, 0], [5, 45, 50], [0, 0, 0]])
    pct = figures.row_percent(cm)
    np.testing.assert_allclose(pct[:2].sum(1), 100)
    np.testing.assert_allclose(pct[0], [80, 20, 0])
    assert np.isnan(pct[2]).all()  # a class without validation pixels has no row, not zeros


def test_low_confidence_share_of_a_known_array(tmp_path):
    conf = np.full((H, W), 90, np.uint8)
    conf[:, :32] = 20  # a quarter of the tile below 50 %
    conf[:, 32:40] = 49  # + 8 columns, just below
    conf[:, 40:48] = 50  # exactly 50: not low
    conf[:48, 120:] = CONFIDENCE_NODATA  # unmapped pixels do not count
    write_raster(tmp_path / "c.tif", make_grid(W, H), conf, "confidence")
    s = rasters.low_confidence_share(rasters.value_counts(tmp_path / "c.tif").counts, 50)
    mapped = H * W - 48 * 8
    assert s["pixels"] == mapped
    assert s["low_share"] == pytest.approx(H * 40 / mapped)
    expected_mean = (H * 32 * 20 + H * 8 * 49 + H * 8 * 50 + (H * 80 - 48 * 8) * 90) / mapped
    assert s["mean"] == pytest.approx(expected_mean)
    assert rasters.low_confidence_share(np.zeros(256), 50)["low_share"] is None


def test_clear_observation_statistics(tmp_path):
    clear = np.full((H, W), 10, np.uint16)
    clear[:12, :] = 0  # never clear
    clear[12:24, :] = 300  # more than 255 dates: uint16 counts
    write_raster(tmp_path / "v.tif", make_grid(W, H), clear, "validity")
    counts = rasters.value_counts(tmp_path / "v.tif").counts
    s = rasters.clear_summary(counts)
    assert s["zero_share"] == pytest.approx(12 / H)
    assert s["mean"] == pytest.approx((12 * 300 + 72 * 10) / H)
    assert s["max"] == 300 and s["pixels"] == H * W


def test_disagreement_places_are_where_the_maps_differ(tmp_path):
    cfg = load_config(REPO / "config.yaml")
    a = np.full((H, W), cfg.class_codes[0], np.uint8)
    a[::4] = cfg.class_codes[1]  # stripes: many class edges, same in both maps
    b = a.copy()
    b[60:84, 90:114] = cfg.class_codes[2]  # 24 x 24 block of disagreement
    write_class_map(tmp_path / "a.tif", make_grid(W, H), cfg.classes, a)
    write_class_map(tmp_path / "b.tif", make_grid(W, H), cfg.classes, b)
    looks = [rasters.quicklook(tmp_path / n) for n in ("a.tif", "b.tif")]
    assert looks[0].shape == (H, W)  # small enough: full resolution
    places, share = rasters.disagreement_places(looks, 1, (H, W), 32, 2)
    r, c = places[0]
    assert r <= 60 and r + 32 >= 84 and c <= 90 and c + 32 >= 114  # the crop holds the whole block
    assert share == pytest.approx(24 * 24 / (H * W))
    assert len(places) == 2 and places[1] != places[0]  # the second place does not overlap the first
    r2, c2 = places[1]
    assert abs(r2 - r) >= 32 or abs(c2 - c) >= 32
    # a single map: places with the most detail, no crash
    one, share1 = rasters.disagreement_places(looks[:1], 1, (H, W), 32, 1)
    assert len(one) == 1 and share1 == 0


class Recorder:
    """A rasterio dataset that records the size of every read."""

    def __init__(self, ds, log: list[int]) -> None:
        self._ds, self._log = ds, log

    def read(self, *args, window=None, out_shape=None, **kw):
        if out_shape is not None:
            self._log.append(int(np.prod(out_shape)))
        elif window is not None:
            self._log.append(int(window.width * window.height))
        else:
            self._log.append(self._ds.width * self._ds.height)
        return self._ds.read(*args, window=window, out_shape=out_shape, **kw)

    def __getattr__(self, name):
        return getattr(self._ds, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._ds.close()


def test_a_tile_is_never_read_whole(tmp_path, monkeypatch):
    """Decimated reads for pictures (from the overviews), 512-px windows for counts, small crops."""
    cfg = load_config(REPO / "config.yaml")
    size = 2048
    rng = np.random.default_rng(0)
    m = cfg.class_codes[rng.integers(0, 5, (size // 64, size // 64))].repeat(64, 0).repeat(64, 1)
    write_class_map(tmp_path / "big.tif", make_grid(size, size), cfg.classes, m)
    with rasterio.open(tmp_path / "big.tif") as src:
        assert src.overviews(1)  # the COG has overviews to serve decimated reads
    log: list[int] = []
    real_open = rasters._open
    monkeypatch.setattr(rasters, "_open", lambda p: Recorder(real_open(p), log))
    counts = rasters.value_counts(tmp_path / "big.tif")
    look = rasters.quicklook(tmp_path / "big.tif")
    factor = rasters.decimation(size, size)
    places, _ = rasters.disagreement_places([look, look], factor, (size, size), 128, 3)
    crop = rasters.read_crop(tmp_path / "big.tif", *places[0], 128)
    assert counts.counts.sum() == size * size and look.shape == (683, 683)  # 2048 / 3
    assert crop.shape == (128, 128)
    assert max(log) <= rasters.QUICKLOOK**2 < size * size
    assert len([n for n in log if n == 512 * 512]) == (size // 512) ** 2  # the counting windows


def test_seed_statistics_mean_and_sample_std():
    names = ["A", "B"]

    def doc(kappa, f1a, t1):
        return {
            "status": "ok",
            "oa": kappa + 0.1,
            "kappa": kappa,
            "tiles": {"T1": {"kappa": t1}},
            "per_class": {"A": {"f1": f1a}, "B": {"f1": None}},
        }

    docs = [doc(0.8, 0.5, 0.7), doc(0.7, 0.6, None), doc(0.9, 0.7, 0.9), None]
    s = collect.seed_statistics(docs, ["T1"], names)
    assert s["kappa"]["mean"] == pytest.approx(0.8) and s["kappa"]["std"] == pytest.approx(0.1)
    assert s["kappa"]["n"] == 3 and s["kappa"]["scores"][3] is None  # a missing seed is skipped
    assert s["tiles"]["T1"]["mean"] == pytest.approx(0.8) and s["tiles"]["T1"]["n"] == 2
    assert s["f1"]["A"]["std"] == pytest.approx(0.1) and s["f1"]["B"]["mean"] is None


def test_benchmark_files_are_read(tmp_path):
    lay = Layout(tmp_path)
    assert provenance.benchmarks(lay) == []
    path = lay.benchmark("predict", "rf_T31TCJ")
    path.parent.mkdir(parents=True)
    path.write_text("s\th:m:s\tmax_rss\tmax_vms\tcpu_time\n12.5\t0:00:12\t345.6\t900\t20.1\n")
    lay.benchmark("compare").parent.mkdir(parents=True)
    lay.benchmark("compare").write_text("s\th:m:s\tmax_rss\n0.4\t0:00:00\tNA\n")
    jobs = provenance.benchmarks(lay)
    assert [(j.rule, j.key, j.seconds, j.max_rss_mb) for j in jobs] == [
        ("compare", "run", 0.4, None),
        ("predict", "rf_T31TCJ", 12.5, 345.6),
    ]
    assert provenance.rule_totals(jobs) == {"compare": 0.4, "predict": 12.5}


def test_git_commit_is_unknown_outside_a_checkout_or_without_git(tmp_path, monkeypatch):
    assert provenance.git_commit(tmp_path) == provenance.UNKNOWN

    def no_git(*a, **k):
        raise FileNotFoundError("git")

    monkeypatch.setattr(subprocess, "run", no_git)
    assert provenance.git_commit() == provenance.UNKNOWN


def test_seed_model_names():
    assert Layout.seed_model("fgunet", 7) == "fgunet-s7"
    assert Layout.split_seed_model("fgunet-s7") == ("fgunet", 7)
    assert Layout.split_seed_model("rfref3") == ("rfref3", None)
    assert Layout.split_seed_model("rf") == ("rf", None)


# ----------------------------------------------------------------------------- the whole report


def test_report_of_a_tiny_run_marks_what_is_missing(tiny_run):
    cfg = tiny_run
    lay = Layout(cfg.workdir)
    out = build_report(cfg)
    assert out == lay.report() and [p.name for p in out.parent.iterdir()] == ["qa_report.html"]
    html = out.read_text()
    names = [c.name for c in cfg.classes]
    page = check_page(html, ["rf", "fgunet"], names, cfg.tiles)

    # T31TDJ has no validation polygon: marked in the run summary and its own section, not zero
    summary = table(page, "summary", collect.OVERALL)
    assert summary["head"][0][-1] == "kappa T31TDJ"
    assert all(row[-1] == NO_VALIDATION for row in summary["rows"])
    tdj = table(page, "summary", "T31TDJ")
    assert all(row[1:4] == [NO_VALIDATION] * 3 for row in tdj["rows"])
    assert "T31TDJ: no validation data, so no per-class scores" in html
    # run-wide scores equal the tile's (the only one with validation data)
    tcj = json.loads(lay.metrics("rf", "T31TCJ").read_text())
    assert summary["rows"][0][2] == f"{tcj['kappa']:.3f}"
    # the per-class table shows the reference support in pixels and hectares (0.01 ha per pixel)
    pc = table(page, "per-class", "T31TCJ")
    assert pc["rows"][0][:3] == ["CUF", f"{30 * 50:,}", "15.00"]

    # missing QA file, missing confidence layer: said so
    assert f"T31TDJ: no geometric QA file ({lay.qa('T31TDJ')})" in html
    conf = table(page, "confidence", "T31TDJ")
    assert conf["rows"][1][1] == "no confidence layer" and conf["rows"][0][1] == "0.0 %"
    qa = table(page, "qa", "T31TCJ")
    assert [r[0] for r in qa["rows"]] == ["RF references vs each other", "rf", "fgunet"]
    assert qa["rows"][1][1] == "1.000"  # rf matched against itself
    # class areas: the tile's whole 96 x 128 px of 10 m are mapped, 122.88 ha per classifier
    areas = table(page, "areas", "T31TCJ")
    assert areas["rows"][-1] == ["total mapped", "122.88", "122.88"]
    assert table(page, "areas", collect.OVERALL)["rows"][-1][1] == "245.76"
    clear = table(page, "clear")
    assert clear["rows"][0] == ["T31TCJ", "0.00 %", "12.0", "12", f"{H * W:,}"]
    # provenance outside Snakemake and without ingest stores
    assert "Not recorded: no Snakemake benchmark files" in html
    assert "T31TCJ: not available (the ingest store" in html
    assert provenance.sha256(provenance.config_text(cfg)) in html
    assert "Variability over seeds" not in html  # one seed only
    # the crops are where fgunet and rf disagree
    assert "where the classifiers disagree most" in html


def test_small_run_scores_are_flagged(tiny_run, tmp_path):
    """Per-class scores on fewer than report.min_class_pixels validation pixels, and a geometric QA
    on too few corners, are shown with a mark and a warning that says why (issue 12 item 6)."""
    cfg = Config({**tiny_run.data, "report": {**tiny_run.data["report"], "min_class_pixels": 1600}})
    html = build_report(cfg, tmp_path / "small.html").read_text()
    names = [c.name for c in cfg.classes]
    page = check_page(html, ["rf", "fgunet"], names, cfg.tiles)
    rows = {r[0]: r for r in table(page, "per-class", "T31TCJ")["rows"]}
    # CUF: 1,500 validation pixels < 1,600, flagged with its scores; ASC: 2,000, plain
    assert rows["CUF"][1] == "1,500 †" and all(c.endswith(" †") for c in rows["CUF"][3:])
    assert rows["ASC"][1] == "2,000" and not any("†" in c for c in rows["ASC"])
    assert rows["BLF"][1] == "0 †"  # no validation pixel at all
    assert "† T31TCJ: CUF, DUF, ICU" in html and "fewer than 1,600 validation pixels" in html
    # the QA compared maps with a handful of corners: its standard error is flagged, and the warning
    qa = json.loads(Layout(cfg.workdir).qa("T31TCJ").read_text())
    assert qa["warnings"] and qa["warnings"][0].startswith("T31TCJ: too few corners")
    assert escape(qa["warnings"][0]) in html
    rf_row = table(page, "qa", "T31TCJ")["rows"][1]
    assert rf_row[3] == f"{qa['models']['rf']['standard_error']:.3f} †"
    # the default threshold (200) leaves both classes of the tile unflagged
    default = build_report(tiny_run, tmp_path / "default.html").read_text()
    rows = {r[0]: r for r in table(parse(default), "per-class", "T31TCJ")["rows"]}
    assert rows["CUF"][1] == "1,500" and rows["ASC"][1] == "2,000"


def test_report_shows_kappa_over_seeds(tiny_run, tmp_path):
    cfg = Config({**tiny_run.data, "run": {**tiny_run.data["run"], "seeds": [42, 7, 9]}})
    lay = Layout(cfg.workdir)
    rf = json.loads(lay.overall_metrics("rf").read_text())
    for seed, kappa in ((7, rf["kappa"] - 0.1), (9, rf["kappa"] + 0.1)):  # another seed, another kappa
        doc = rf | {"kappa": kappa, "model": f"rf-s{seed}"}
        name = cfg.classes[4].name  # and another F-score: 0.2 below, 0.2 above
        f1 = rf["per_class"][name]["f1"] + (0.2 if seed == 9 else -0.2)
        doc["per_class"] = rf["per_class"] | {name: rf["per_class"][name] | {"f1": f1}}
        path = lay.overall_metrics(Layout.seed_model("rf", seed))
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(doc))
    html = build_report(cfg, tmp_path / "seeds.html").read_text()
    page = check_page(html, ["rf", "fgunet"], [c.name for c in cfg.classes], cfg.tiles)
    seeds = table(page, "seeds")
    rf_row, fg_row = seeds["rows"]
    assert rf_row[:4] == ["rf", "3", f"{rf['kappa']:.3f}", "0.100"]
    assert fg_row[0] == "fgunet" and fg_row[1] == "1"  # fgunet's extra seeds are missing
    f1 = {r[0]: r for r in table(page, "seed-f1")["rows"]}
    name = cfg.classes[0].name
    one = rf["per_class"][name]["f1"]  # the three seeds share it: mean itself, std 0
    assert f1[name][1] == f"{one:.3f} ± 0.000" and f1[name][2] == f"{one:.3f} ± 0.000"
    moved = rf["per_class"][cfg.classes[4].name]["f1"]  # -0.2, 0, +0.2: sample std 0.2
    assert f1[cfg.classes[4].name][1] == f"{moved:.3f} ± 0.200"
    assert table(page, "seed-f1")["head"][0] == ["class", "rf", "fgunet"]


def test_tile_without_validation_polygons_validates_as_no_validation_data(tmp_path):
    """The chain's own path to that case: the split puts a training polygon on the tile but no
    validation polygon; rasterise and validate go through and say so."""
    cfg = load_config(REPO / "config.yaml")
    grid = make_grid(W, H)
    create_store(tmp_path / "T31TCJ.ingest.zarr", "ingest", grid, tile="T31TCJ")  # the tile grid only
    x0, y0 = grid.transform.c, grid.transform.f
    polygons = gpd.GeoDataFrame(
        {
            "id": [1],
            "code": [int(cfg.class_codes[0])],
            "tile": ["T31TCJ"],
            "split": ["train"],
            "fold": [0],
            "selection": [0],
        },
        geometry=[box(x0 + 100, y0 - 400, x0 + 500, y0 - 100)],
        crs=grid.crs,
    )
    polygons.to_file(tmp_path / "split.gpkg", layer="reference", driver="GPKG")
    labels = tmp_path / "T31TCJ.zarr"
    rasterise_tile(tmp_path / "split.gpkg", "T31TCJ", tmp_path / "T31TCJ.ingest.zarr", labels)
    write_class_map(tmp_path / "map.tif", grid, cfg.classes, np.full((H, W), cfg.class_codes[0], np.uint8))
    validate_tile(cfg, tmp_path / "map.tif", labels, tmp_path / "m.json")
    doc = json.loads((tmp_path / "m.json").read_text())
    assert doc["status"] == NO_VALIDATION and doc["kappa"] is None and doc["n_pixels"] == 0


def test_unmapped_validation_pixels_are_counted_not_called_missing(tmp_path, caplog):
    """A tile cloudy on every date maps to no-data: its validation pixels are there, unmapped. The
    metrics say so (and count them), rather than "no validation data"; run-wide they add up."""
    cfg = load_config(REPO / "config.yaml")
    grid = make_grid(W, H)
    create_store(tmp_path / "T31TCJ.ingest.zarr", "ingest", grid, tile="T31TCJ")
    x0, y0 = grid.transform.c, grid.transform.f
    polygons = gpd.GeoDataFrame(
        {"id": [1, 2], "code": [int(cfg.class_codes[0])] * 2, "tile": ["T31TCJ"] * 2,
         "split": ["validation"] * 2, "fold": [0, 1], "selection": [0, 0]},
        geometry=[box(x0 + 100, y0 - 400, x0 + 500, y0 - 100), box(x0 + 900, y0 - 400, x0 + 1200, y0 - 100)],
        crs=grid.crs,
    )  # fmt: skip
    polygons.to_file(tmp_path / "split.gpkg", layer="reference", driver="GPKG")
    labels = tmp_path / "T31TCJ.zarr"
    rasterise_tile(tmp_path / "split.gpkg", "T31TCJ", tmp_path / "T31TCJ.ingest.zarr", labels)
    truth = np.asarray(zarr.open_group(str(labels), mode="r")["validation"][:])
    left = np.zeros_like(truth, bool)
    left[:, : W // 2] = True  # the first polygon lies in the left half, the second in the right
    n_left, n_right = int((truth > 0)[left].sum()), int((truth > 0)[~left].sum())
    assert n_left > 0 and n_right > 0
    code = cfg.class_codes[0]
    write_class_map(tmp_path / "none.tif", grid, cfg.classes, np.zeros((H, W), np.uint8))
    write_class_map(tmp_path / "half.tif", grid, cfg.classes, np.where(left, 0, code).astype(np.uint8))
    with caplog.at_level("WARNING"):
        validate_tile(cfg, tmp_path / "none.tif", labels, tmp_path / "none.json")
    assert f"{n_left + n_right} of {n_left + n_right} validation pixels are no-data in the map" in caplog.text
    validate_tile(cfg, tmp_path / "half.tif", labels, tmp_path / "half.json")
    none, half = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("none", "half"))
    assert (
        none["status"] == UNMAPPED and none["n_pixels"] == 0 and none["unmapped_pixels"] == n_left + n_right
    )
    assert half["status"] == "ok" and half["n_pixels"] == n_right and half["unmapped_pixels"] == n_left
    assert half["oa"] == 1.0  # scored over the mapped pixels, the unmapped ones beside
    summarise(cfg, [tmp_path / "half.json"], tmp_path / "run.json")
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["unmapped_pixels"] == n_left and run["tiles"]["T31TCJ"]["unmapped_pixels"] == n_left
    html = tables.summary({"rf": half, "fgunet": none}, [], "tile")
    assert f"{n_right:,} (+{n_left:,} unmapped)" in html and UNMAPPED in html


def test_map_on_another_grid_than_the_validity_layer_is_a_clear_error(tiny_run, capsys):
    cfg = tiny_run
    lay = Layout(cfg.workdir)
    shifted = make_grid(W, H, ulx=399970.0)
    write_raster(lay.validity("T31TDJ"), shifted, np.full((H, W), 3), "validity")
    with pytest.raises(PipelineError, match="differs from the one of"):
        build_report(cfg)
    cfg_file = str(Path(cfg.workdir).parent / "config.yaml")
    assert main(["report", "--config", cfg_file]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {lay.class_map('rf', 'T31TDJ')}: pixel grid") and "\n" not in err
    assert not lay.report().exists()


def test_report_keeps_the_previous_file_when_it_fails(tiny_run, monkeypatch):
    lay = Layout(tiny_run.workdir)
    lay.report().parent.mkdir(parents=True)
    lay.report().write_text("previous")
    monkeypatch.setattr("pipeline.report.page", lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError):
        build_report(tiny_run)
    assert lay.report().read_text() == "previous"
    assert [p.name for p in lay.report().parent.iterdir()] == ["qa_report.html"]


# --------------------------------------------------------------------------- seeds in the CLI / DAG


def test_train_seed_arguments(tmp_path, monkeypatch):
    """`train --model rf --seed 7` == `train --model rf-s7`: models/rf-s7, every seed from 7."""
    cfg = make_config(tmp_path, seeds=[42, 7])
    calls = []
    monkeypatch.setattr(
        "pipeline.train.train", lambda c, model, **kw: calls.append((c.seed, model, kw["out_dir"]))
    )
    cfg_file = str(tmp_path / "config.yaml")
    for args in (["--model", "rf", "--seed", "7"], ["--model", "rf-s7"], ["--model", "rf"], ["--seed", "42"]):
        assert main(["train", "--config", cfg_file, *args]) == 0
    lay = Layout(cfg.workdir)
    assert calls == [(7, "rf", lay.model_dir("rf-s7"))] * 2 + [(42, "rf", lay.model_dir("rf"))] * 2
    assert derive_seed(7, "rf") != derive_seed(42, "rf")
    assert main(["train", "--config", cfg_file, "--model", "rf-s7", "--seed", "8"]) == 2


def test_extra_seeds_are_wired_through_snakemake(tmp_path):
    """A dry run: rf-s7 and fgunet-s7 are trained (--model <name>-s7), mapped, validated and
    summarised, feed the report, and stay out of the geometric QA and the comparison table."""
    raw = yaml.safe_load((REPO / "config.yaml").read_text())
    raw["run"].update(workdir="results", seeds=[42, 7])
    raw["demo"]["out"] = "inputs"
    raw["inputs"]["tiles"] = {t: {"format": "theia", "path": f"inputs/{t}"} for t in raw["inputs"]["tiles"]}
    raw["inputs"]["reference"] = "inputs/reference.gpkg"
    raw["inputs"]["regions"] = "inputs/regions.gpkg"
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    cmd = [
        sys.executable,
        "-m",
        "snakemake",
        "--snakefile",
        str(REPO / "Snakefile"),
        "--dry-run",
        "--printshellcmds",
    ]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    for name in ("rf-s7", "fgunet-s7"):
        assert f"train --model {name} --out results/models/{name} " in out
        assert f"results/maps/{name}/T31TDJ.tif" in out and f"results/metrics/{name}/overall.json" in out
    report_job = re.search(r"rule report:\n\s+input: (.*)\n", out).group(1)
    assert "results/metrics/rf-s7/overall.json" in report_job and "results/maps/rf-s7" not in report_job
    qa_job = re.search(r"rule qa:\n\s+input: (.*)\n", out).group(1)
    assert "-s7" not in qa_job
    compare_job = re.search(r"rule compare:\n\s+input: (.*)\n", out).group(1)
    assert "-s7" not in compare_job
    assert re.search(r"benchmark: results/benchmarks/train/rf-s7\.tsv", out)


def test_the_run_summary_says_what_the_split_left_out_and_recoded(tiny_run, tmp_path):
    from pipeline.report.sections import reference_line

    counts = {"ignored": {"99": 2}, "remapped": {"1110->11": 5}, "outside": 1, "eroded": 0, "kept": 1234}
    assert reference_line(counts) == (
        "1,234 kept; left out: 2 of code 99 (reference.ignore_codes), 1 outside every tile; "
        "recoded (reference.remap): 1110->11 (5)"
    )
    assert reference_line({"kept": 3, "outside": 0, "eroded": 0}) == "3 kept"
    html = build_report(tiny_run, tmp_path / "r.html").read_text()
    assert "not recorded (no split file, or one written by an older version)" in html


def test_the_national_section_counts_areas_once_and_shows_the_regions(tiny_run, tmp_path):
    """Both tiles of the tiny run lie on one grid: the mosaic maps each place once (half the tile
    sum), the report shows its areas, and the regions' rows add up to them."""
    from pipeline.mosaic import TileLayers, mosaic_classifier
    from pipeline.regions import regions_stage

    regions = tmp_path / "regions.gpkg"
    left, top = 399960.0, 4800000.0
    halves = [box(left, top - H * 10, left + 600, top), box(left + 600, top - H * 10, left + W * 10, top)]
    gpd.GeoDataFrame({"code": ["W", "E"], "label": ["West", "East"]}, geometry=halves, crs=32631).to_file(
        regions
    )
    raw = yaml.safe_load(Path(tmp_path / "config.yaml").read_text())
    raw["inputs"].update(regions=str(regions), region_id_field="code", region_name_field="label")
    del raw["demo"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    cfg = load_config(tmp_path / "config.yaml")
    lay = Layout(cfg.workdir)
    for t in cfg.tiles:  # the uncertainty layer of inference.probabilities, on the maps' grids
        with rasterio.open(lay.class_map("rf", t)) as src:
            grid = Grid(src.crs, src.transform, src.width, src.height)
        with margin_writer(lay.margin("rf", t), grid) as sink:
            sink.write(
                Window(0, 0, grid.width, grid.height), np.full((grid.height, grid.width), 40, np.uint8)
            )
    layers = [
        TileLayers(t, lay.class_map("rf", t), lay.confidence("rf", t), lay.validity(t), lay.margin("rf", t))
        for t in cfg.tiles
    ]
    summary = mosaic_classifier(cfg, "rf", layers, lay.mosaic_dir("rf"))
    assert summary["margin"] and lay.mosaic("rf", "margin").exists()
    assert summary["mapped_pixels"] == H * W  # not 2 x H x W: the tiles coincide
    rows = regions_stage(
        cfg, lay.mosaic_dir("rf"), lay.mosaic("rf", "regions"), lay.mosaic("rf", "regions_layer")
    )
    assert sum(r["pixels"] for r in rows) == H * W
    assert sum(r["area_ha"] for r in rows) == pytest.approx(summary["mapped_area_ha"], rel=1e-9)
    assert sum(r["pixels"] for r in rows if r["region_id"] == "W") == 60 * H

    html = build_report(cfg).read_text()
    page = check_page(html, ["rf", "fgunet"], [c.name for c in cfg.classes], cfg.tiles)
    national = table(page, "areas", "national")
    assert national["head"][0] == ["class", "rf (ha)", "fgunet (ha)"]
    assert national["rows"][-1][1:] == [f"{summary['mapped_area_ha']:,.2f}", "no mosaic"]
    # a conformal CRS away from its central meridian: the true area is not the nominal 122.88 ha
    assert summary["mapped_area_ha"] != pytest.approx(122.88, rel=1e-4)
    assert f"rf would map {245.76 - summary['mapped_area_ha']:,.1f} ha more" in html
    assert "No complete mosaic for fgunet" in html  # its T31TDJ confidence layer is missing
    reg = table(page, "regions")
    assert [r[0] for r in reg["rows"]] == ["East (E)", "West (W)"]  # the larger first
    assert "class shares per region" in html
    assert "Where each map hesitates" in html and 'alt="national uncertainty"' in html
    # the same mosaic without inference.probabilities: no stale uncertainty layer is left or shown
    plain = [TileLayers(t.tile, t.classes, t.confidence, t.clear) for t in layers]
    assert not mosaic_classifier(cfg, "rf", plain, lay.mosaic_dir("rf"))["margin"]
    assert not lay.mosaic("rf", "margin").exists()
    assert "Where each map hesitates" not in build_report(cfg).read_text()


def test_the_training_section_says_how_each_model_was_trained(tiny_run):
    """Hand-written model.json files (a forest, and a network with a refitted last layer whose
    second epoch was kept) give the rows below; a model not trained yet is marked missing."""
    cfg = tiny_run
    lay = Layout(cfg.workdir)
    lay.model_dir("rf").mkdir(parents=True)
    lay.model_meta("rf").write_text(
        json.dumps(
            {
                "params": {"n_estimators": 100, "max_depth": 20},
                "samples": {"per_class_target": 50, "counts": {"11": 50, "12": 30}},
                "timing_s": {"sampling": 1.25, "fit": 4.0},
            }
        )
    )
    history = [{"epoch": e, "sel_kappa": k} for e, k in ((1, 0.25), (2, 0.5), (3, 0.4))]
    refit = {"pixels": 80, "features": 12, "cpu_s": 3.0}
    training = {"epochs": 3, "steps_per_epoch": 25, "batch_size": 8, "patch_size": 64, "nodes": 1}
    training |= {"history": history, "kept_epoch": 2, "precision_used": "fp32", "head_refit": refit}
    meta = {"params": {"arch": "fgunet", "parameters": 1234}, "training": training}
    meta["timing_s"] = {"training": 99.6}
    lay.model_dir("fgunet").mkdir(parents=True)
    lay.model_meta("fgunet").write_text(json.dumps(meta))
    names = [c.name for c in cfg.classes]
    page = check_page(build_report(cfg).read_text(), ["rf", "fgunet"], names, cfg.tiles)
    rows = {r[0]: r for r in table(page, "training")["rows"]}
    assert rows["rf"] == ["rf", "100 trees, depth <= 20", "80 px (<= 50 per class)", "–", "–", "–", "5 s"]
    assert rows["fgunet"] == [
        "fgunet",
        "fgunet, 1,234 parameters",
        "3 x 25 steps of 8 x 64-px patches x 1 process(es), fp32",
        "epoch 2 of 3 (selection kappa 0.500)",
        "refitted: logistic regression on 80 px x 12 features",
        "scratch",
        "100 s",
    ]
    # without its model.json the row says so instead of inventing figures
    lay.model_meta("fgunet").unlink()
    page = check_page(build_report(cfg).read_text(), ["rf", "fgunet"], names, cfg.tiles)
    assert table(page, "training")["rows"][1] == ["fgunet", *["missing"] * 6]


def test_the_report_says_which_differences_to_rf_the_polygons_can_tell(tiny_run, tmp_path):
    """24 validation squares (12 per class, each a polygon): fgunet maps every one right, rf gets a
    third of every class-0 square wrong. The difference of kappa and class 0's F-score is told
    (interval above 0), the class with no difference gets [0, 0]."""
    cfg, lay, codes = tiny_run, Layout(tiny_run.workdir), tiny_run.class_codes
    grid = make_grid(W, H)
    truth = np.zeros((H, W), np.uint8)
    ids = np.zeros((H, W), np.int32)
    for i in range(24):
        r, c = 4 + 22 * (i // 6), 4 + 20 * (i % 6)
        truth[r : r + 8, c : c + 8] = codes[0] if i % 2 else codes[4]
        ids[r : r + 8, c : c + 8] = i + 1
    rf = np.where(truth == 0, codes[9], truth).astype(np.uint8)
    rf[(truth == codes[0]) & (np.arange(W) % 3 == 0)] = codes[4]
    fg = np.where(truth == 0, codes[9], truth).astype(np.uint8)
    labels = write_labels(tmp_path / "ids.zarr", grid, truth, "T31TCJ")
    add_array(zarr.open_group(labels, mode="r+"), "validation_id", truth.shape, "int32", 0)[:] = ids
    for name, m in (("rf", rf), ("fgunet", fg)):
        write_class_map(lay.class_map(name, "T31TCJ"), grid, cfg.classes, m)
        validate_tile(cfg, lay.class_map(name, "T31TCJ"), labels, lay.metrics(name, "T31TCJ"))
        summarise(cfg, [lay.metrics(name, "T31TCJ")], lay.overall_metrics(name), model=name)
    html = build_report(cfg, tmp_path / "diff.html").read_text()
    page = check_page(html, ["rf", "fgunet"], [c.name for c in cfg.classes], cfg.tiles)
    t = table(page, "differences", collect.OVERALL)
    assert t["head"][0] == ["", "validation polygons", "fgunet - rf"]
    rows = {r[0]: r for r in t["rows"]}
    names = [c.name for c in cfg.classes]
    assert rows["kappa"][2].startswith("+0.") and rows["kappa"][2].endswith("*")
    assert rows[f"F1 {names[0]}"][1] == "12" and rows[f"F1 {names[0]}"][2].endswith("*")
    assert rows[f"F1 {names[2]}"][1] == "0" and rows[f"F1 {names[2]}"][2] == ""
    assert "Differences to RF the validation polygons can tell" in html
