"""Reference polygons: checks, polygon-level stratified split, rasterisation on the tile grid."""

from __future__ import annotations

import geopandas as gpd
import numpy as np
import pyogrio
import pytest
import yaml
from shapely.geometry import Polygon, box

from pipeline.config import Config, validate
from pipeline.errors import PipelineError
from pipeline.io.tilestore import create_store, open_store
from pipeline.reference import fold_table, rasterise_tile, split_counts, split_polygons, split_table
from tests.conftest import REPO, make_grid

ULX, ULY = 399960.0, 4800000.0


def _config(tmp_path, polygons, erosion=0.0) -> Config:
    raw = yaml.safe_load((REPO / "config.yaml").read_text())
    raw.pop("demo")
    raw["run"]["workdir"] = str(tmp_path / "run")
    raw["inputs"]["reference"] = str(polygons)
    raw["reference"]["erosion_m"] = erosion
    return Config(validate(raw))


def _grids(tmp_path) -> dict:
    """Two 128x96 tiles side by side, sharing 16 columns."""
    out = {}
    for k, name in enumerate(["T31TCJ", "T31TDJ"]):
        path = tmp_path / f"{name}.zarr"
        create_store(path, "ingest", make_grid(128, 96, ulx=ULX + k * 112 * 10), tile=name)
        out[name] = path
    return out


def _write(tmp_path, rows, name="ref.gpkg", crs="EPSG:32631"):
    gdf = gpd.GeoDataFrame(rows, geometry=[r.pop("geometry") for r in rows], crs=crs)
    path = tmp_path / name
    pyogrio.write_dataframe(gdf, path, driver="GPKG")
    return path


def _square(col, row, size=5):
    """A square covering pixels [row, row+size) x [col, col+size) of the first tile."""
    x0, y0 = ULX + col * 10, ULY - row * 10
    return box(x0, y0 - size * 10, x0 + size * 10, y0)


def test_split_table_invariants():
    rng = np.random.default_rng(0)
    tile = rng.choice(["A", "B"], 600)
    code = rng.choice([11, 12, 31, 51], 600)
    s = split_table(tile, code, 0.67, seed=1)
    assert set(np.unique(s)) == {1, 2}
    for t in "AB":
        for c in (11, 12, 31, 51):
            m = (tile == t) & (code == c)
            n_train = int((s[m] == 1).sum())
            assert n_train == int(np.floor(m.sum() * 0.67 + 0.5))  # ratio enforced per tile x class
    np.testing.assert_array_equal(s, split_table(tile, code, 0.67, seed=1))
    assert (s != split_table(tile, code, 0.67, seed=2)).any()
    # a single polygon of a class still trains
    assert split_table(np.array(["A"]), np.array([11]), 0.67, 0).tolist() == [1]


def test_split_and_rasterise_end_to_end(tmp_path):
    grids = _grids(tmp_path)
    rows = []
    for i in range(12):  # 12 squares of class 11 and 6 of class 31 in the first tile
        rows.append({"id": i + 1, "code": 11 if i < 12 else 31, "geometry": _square(2 + 8 * (i % 12), 2)})
    for i in range(6):
        rows.append({"id": 100 + i, "code": 31, "geometry": _square(2 + 8 * i, 40)})
    # one polygon in the second tile only, and one straddling the shared strip (centroid in tile 1)
    rows.append({"id": 200, "code": 51, "geometry": _square(200, 60)})
    rows.append({"id": 300, "code": 51, "geometry": _square(110, 80, size=8)})
    cfg = _config(tmp_path, _write(tmp_path, rows))
    split = tmp_path / "split.gpkg"
    split_polygons(cfg, grids, split)
    table = gpd.read_file(split)
    assert table["id"].is_unique  # no polygon in both sets
    assert dict(table.set_index("id")["tile"])[200] == "T31TDJ"
    assert dict(table.set_index("id")["tile"])[300] == "T31TCJ"
    cls11 = table[table.code == 11]
    assert (cls11.split == "train").sum() == 8  # round(12 * 0.67)
    assert (table[table.code == 31].split == "train").sum() == 4

    labels = {}
    for tile, g in grids.items():
        out = tmp_path / f"{tile}_labels.zarr"
        rasterise_tile(split, tile, g, out)
        store = open_store(out, "reference", ("train", "validation"))
        labels[tile] = (store["train"][:], store["validation"][:])
    train, val = labels["T31TCJ"]
    assert not ((train > 0) & (val > 0)).any()
    for _, r in table[table.tile == "T31TCJ"].iterrows():
        if r.id == 300:
            continue
        col, row = int((r.geometry.bounds[0] - ULX) / 10), int((ULY - r.geometry.bounds[3]) / 10)
        target = train if r.split == "train" else val
        assert (target[row : row + 5, col : col + 5] == r.code).all()  # 25 px each, by hand
    assert (train > 0).sum() + (val > 0).sum() == 18 * 25 + 8 * 8  # 18 squares + id 300 (cols 110-117 < 128)
    # the straddling polygon is burnt in both tiles with ONE split
    s300 = table.set_index("id").loc[300, "split"]
    t2 = labels["T31TDJ"][0 if s300 == "train" else 1]
    # tile 2 starts at column 112 of tile 1: id 300 keeps columns 112-117 there (8 rows x 6)
    assert (t2 == 51).sum() == 8 * 6 + 25 * (s300 == table.set_index("id").loc[200, "split"])
    # folds: every training polygon has one (validation -1); its pixels carry fold + 1
    assert (table[table.split == "validation"].fold == -1).all()
    assert table[table.split == "train"].fold.between(0, cfg["qa"]["references"] - 1).all()
    fold_px = open_store(tmp_path / "T31TCJ_labels.zarr", "reference", ("train_fold",))["train_fold"][:]
    assert ((fold_px > 0) == (train > 0)).all()
    for _, r in table[(table.tile == "T31TCJ") & (table.split == "train") & (table.id != 300)].iterrows():
        col, row = int((r.geometry.bounds[0] - ULX) / 10), int((ULY - r.geometry.bounds[3]) / 10)
        assert (fold_px[row : row + 5, col : col + 5] == r.fold + 1).all()


def test_fold_table_deals_each_stratum_round_robin():
    rng = np.random.default_rng(0)
    tile = rng.choice(["A", "B"], 500)
    code = rng.choice([11, 31, 51], 500)
    split = rng.choice([1, 2], 500, p=[0.67, 0.33]).astype(np.uint8)
    folds = fold_table(tile, code, split, 10, seed=3)
    assert (folds[split == 2] == -1).all()
    for t in "AB":
        for c in (11, 31, 51):
            f = folds[(tile == t) & (code == c) & (split == 1)]
            counts = np.bincount(f, minlength=10)
            assert counts.max() - counts.min() <= 1  # as even as the stratum allows
    np.testing.assert_array_equal(folds, fold_table(tile, code, split, 10, seed=3))


def test_erosion_shrinks_and_drops(tmp_path):
    grids = _grids(tmp_path)
    rows = [{"id": 1, "code": 11, "geometry": _square(10, 10, size=9)},
            {"id": 2, "code": 11, "geometry": _square(40, 10, size=1)}]  # fmt: skip
    cfg = _config(tmp_path, _write(tmp_path, rows), erosion=20.0)
    split = tmp_path / "split.gpkg"
    split_polygons(cfg, grids, split)
    table = gpd.read_file(split)
    assert table["id"].tolist() == [1]  # the 10 m square vanished
    assert table.geometry.iloc[0].area == pytest.approx(50.0 * 50.0)  # 90 m - 2 x 20 m


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("empty", "the polygon layer is empty"),
        ("invalid", "invalid polygon geometries (first: id 2"),
        ("outside", "none of the 1 polygons falls inside the tiles"),
        ("unknown", "class codes [99] are not in the config nomenclature"),
        ("field", "no class field 'code'"),
        ("points", "not polygons"),
        ("float", "class field 'code' holds non-integer codes (e.g. 11.5)"),
        ("null", "1 polygons without a class in 'code' (first: id 2)"),
        ("text", "class field 'code' is not integer"),
    ],
)
def test_bad_reference_layers(tmp_path, case, message):
    grids = _grids(tmp_path)
    ok = {"id": 1, "code": 11, "geometry": _square(5, 5)}
    if case == "empty":
        gdf = gpd.GeoDataFrame({"id": [], "code": []}, geometry=[], crs="EPSG:32631")
        path = tmp_path / "ref.gpkg"
        pyogrio.write_dataframe(gdf, path, driver="GPKG")
    elif case == "invalid":
        bowtie = Polygon([(ULX, ULY), (ULX + 100, ULY - 100), (ULX + 100, ULY), (ULX, ULY - 100)])
        path = _write(tmp_path, [ok, {"id": 2, "code": 11, "geometry": bowtie}])
    elif case == "outside":
        path = _write(tmp_path, [{"id": 1, "code": 11, "geometry": box(0, 0, 100, 100)}])
    elif case == "unknown":
        path = _write(tmp_path, [ok, {"id": 2, "code": 99, "geometry": _square(20, 20)}])
    elif case == "field":
        path = _write(tmp_path, [{"id": 1, "klass": 11, "geometry": _square(5, 5)}])
    elif case in ("float", "null", "text"):  # field types a user's layer may hold
        other = {"float": 11.5, "null": None, "text": "forest"}[case]
        first = {"float": 11.0, "null": 11.0, "text": "11"}[case]
        path = _write(tmp_path, [ok | {"code": first}, {"id": 2, "code": other, "geometry": _square(20, 20)}])
    else:
        from shapely.geometry import Point

        path = _write(tmp_path, [{"id": 1, "code": 11, "geometry": Point(ULX + 5, ULY - 5)}])
    cfg = _config(tmp_path, path)
    out = tmp_path / "split.gpkg"
    with pytest.raises(PipelineError) as err:
        split_polygons(cfg, grids, out)
    assert str(err.value).startswith(str(path)) and message in str(err.value)
    assert not out.exists()


def test_reprojected_polygons_land_on_the_same_pixels(tmp_path):
    grids = _grids(tmp_path)
    sq = _square(30, 30, size=6)
    utm = gpd.GeoSeries([sq], crs="EPSG:32631")
    wgs = utm.to_crs("EPSG:4326").iloc[0]
    cfg = _config(tmp_path, _write(tmp_path, [{"id": 1, "code": 31, "geometry": wgs}], crs="EPSG:4326"))
    split = tmp_path / "split.gpkg"
    split_polygons(cfg, grids, split)
    out = tmp_path / "lab.zarr"
    rasterise_tile(split, "T31TCJ", grids["T31TCJ"], out)
    train = open_store(out, "reference")["train"][:]
    # the reprojected square's edges are slightly curved: its interior pixels are all burnt
    assert (train[31:35, 31:35] == 31).all() and 30 <= (train == 31).sum() <= 42


def test_polygons_across_tile_edges_are_kept_and_burnt_on_every_tile_with_one_split(tmp_path, caplog):
    """Issue 12: a polygon whose centroid lies outside every tile but which overlaps one was dropped
    (27 % of the labelled pixels of a real patch). It is kept, homed on the tile it overlaps most,
    and burnt wherever it overlaps, with the one split of the polygon."""
    grids = _grids(tmp_path)  # tile A: columns 0-127; tile B: columns 112-239 of A's lattice
    hanging = box(ULX + 100, ULY + 80, ULX + 200, ULY - 40)  # rows -8..3, cols 10..19: centroid above A
    straddling = box(ULX + 1240, ULY - 500, ULX + 1400, ULY - 400)  # cols 124..139: centroid in B only
    gone = _square(60, 60, size=2)  # 20 m wide: eroded away by 20 m
    far = box(0, 0, 100, 100)
    rows = [
        {"id": 1, "code": 11, "geometry": hanging},
        {"id": 2, "code": 31, "geometry": straddling},
        {"id": 3, "code": 11, "geometry": gone},
        {"id": 4, "code": 11, "geometry": far},
        *({"id": 10 + i, "code": 11, "geometry": _square(5 + 8 * i, 30)} for i in range(6)),
    ]
    ref = _write(tmp_path, rows)
    split = tmp_path / "split.gpkg"
    with caplog.at_level("INFO"):
        split_polygons(_config(tmp_path, ref, erosion=0.0), grids, split)
    assert "1 polygons ignored: 1 outside every tile, 0 eroded away" in caplog.text
    assert "1 polygons whose centroid lies outside every tile kept by their overlap" in caplog.text
    table = gpd.read_file(split).set_index("id")
    assert table.loc[1, "tile"] == "T31TCJ" and table.loc[2, "tile"] == "T31TDJ"
    assert 4 not in table.index
    labels = {}
    for tile, g in grids.items():
        out = tmp_path / f"{tile}_labels.zarr"
        rasterise_tile(split, tile, g, out)
        store = open_store(out, "reference", ("train", "validation"))
        labels[tile] = store["train"][:] + store["validation"][:]
    a, b = labels["T31TCJ"], labels["T31TDJ"]
    assert (a[0:4, 10:20] == 11).all() and (a[4, 10:20] == 0).all()  # the 4 rows of the hanging one
    assert (a[40:50, 124:128] == 31).all() and (b[40:50, 12:28] == 31).all()  # both tiles
    kind = table.loc[2, "split"]
    for tile in labels:
        store = open_store(tmp_path / f"{tile}_labels.zarr", "reference", ("train", "validation"))
        other = "validation" if kind == "train" else "train"
        assert not (store[other][:] == 31).any()  # one split for the polygon, on both tiles
    # with erosion, the 2-px square goes, and the warning says why
    caplog.clear()
    with caplog.at_level("WARNING"):
        split_polygons(_config(tmp_path, ref, erosion=20.0), grids, tmp_path / "s2.gpkg")
    assert "2 polygons ignored: 1 outside every tile, 1 eroded away by reference.erosion_m 20" in caplog.text


def test_ignored_and_remapped_codes_are_applied_and_counted(tmp_path):
    """A crop-type layer (codes above the nomenclature's) recoded by reference.remap, its
    'unknown' code left out by reference.ignore_codes: the split holds nomenclature codes only,
    and records what it did per code, with the polygons dropped outside the tiles."""
    grids = _grids(tmp_path)
    rows = [{"id": i + 1, "code": 1110, "geometry": _square(2 + 8 * i, 2)} for i in range(4)]
    rows += [{"id": 10 + i, "code": 9120, "geometry": _square(2 + 8 * i, 20)} for i in range(3)]
    rows += [{"id": 20 + i, "code": 99, "geometry": _square(2 + 8 * i, 40)} for i in range(2)]
    rows += [{"id": 30, "code": 11, "geometry": _square(2, 60)}]
    rows += [{"id": 40, "code": 1110, "geometry": box(ULX - 5000, ULY - 5000, ULX - 4000, ULY - 4000)}]
    path = _write(tmp_path, rows)
    cfg = _config(tmp_path, path)
    cfg = Config(validate({**cfg.data, "reference": {**cfg["reference"], "ignore_codes": [99],
                                                     "remap": {"1110": 11, "9120": 211}}}))  # fmt: skip
    split = tmp_path / "split.gpkg"
    split_polygons(cfg, grids, split)
    table = gpd.read_file(split).set_index("id")
    assert sorted(table.index) == [1, 2, 3, 4, 10, 11, 12, 30]  # 99s left out, id 40 outside
    assert (table.loc[[1, 2, 3, 4, 30], "code"] == 11).all()
    assert (table.loc[[10, 11, 12], "code"] == 211).all()
    assert split_counts(split) == {
        "ignored": {"99": 2},
        "remapped": {"1110->11": 5, "9120->211": 3},
        "outside": 1,
        "eroded": 0,
        "kept": 8,
    }
    # without the remap, the unknown codes are named with the two ways out
    with pytest.raises(PipelineError) as err:
        split_polygons(_config(tmp_path, path), grids, tmp_path / "other.gpkg")
    assert str(err.value) == (
        f"{path}: class codes [99, 1110, 9120] are not in the config nomenclature (add them, map them "
        "to a class with reference.remap, or leave them out with reference.ignore_codes)"
    )


def test_remap_and_ignore_settings_are_checked(tmp_path):
    raw = _config(tmp_path, tmp_path / "ref.gpkg").data
    bad = {**raw, "reference": {**raw["reference"], "remap": {"1110": 7}}}
    with pytest.raises(PipelineError, match=r"'reference/remap': target codes \[7\] are not in the nomencl"):
        validate(bad)
    both = {**raw, "reference": {**raw["reference"], "remap": {"99": 11}, "ignore_codes": [99]}}
    with pytest.raises(PipelineError, match=r"codes \[99\] are both in ignore_codes and remapped"):
        validate(both)
