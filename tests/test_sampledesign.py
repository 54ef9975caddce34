"""The accuracy sample's I/O shell: the drawn ranks land on the right pixels (against a brute-force
scan), the design's invariants, and labelled samples that do not match their design."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pyogrio
import pytest
import rasterio
import yaml

from pipeline.config import Config, validate
from pipeline.errors import PipelineError
from pipeline.io.cog import write_class_map
from pipeline.io.tilestore import iter_windows, win_slices
from pipeline.sampledesign import (
    BLOCK,
    count_classes,
    design_sample,
    draw_ranks,
    estimate_stage,
    pick_pixels,
)
from tests.conftest import REPO, make_grid


def _config(tmp_path, **accuracy) -> Config:
    raw = yaml.safe_load((REPO / "config.yaml").read_text())
    raw.pop("demo")
    raw["run"]["workdir"] = str(tmp_path / "run")
    raw["accuracy"] = {"enabled": True, **accuracy}
    return Config(validate(raw))


def _mosaic(tmp_path, cfg, shape=(1500, 1300)):
    """Three classes in bands plus speckle, and a no-data corner; larger than one block."""
    codes = cfg.class_codes
    rng = np.random.default_rng(0)
    h, w = shape
    data = np.full(shape, codes[0], np.uint8)
    data[:, w // 2 :] = codes[1]
    data[rng.random(shape) < 0.01] = codes[2]  # a rare class
    data[:100, :100] = 0
    path = tmp_path / "classes.tif"
    write_class_map(path, make_grid(w, h), cfg.classes, data)
    return path, data


def test_drawn_ranks_land_on_the_pixels_a_brute_force_scan_finds(tmp_path):
    cfg = _config(tmp_path)
    path, data = _mosaic(tmp_path, cfg)
    codes = cfg.class_codes[:3]
    sizes = count_classes(path, codes)
    assert sizes.tolist() == [int((data == c).sum()) for c in codes]
    ranks = draw_ranks(sizes, [40, 40, 40], seed=5)
    picked = pick_pixels(path, codes, ranks)
    # brute force: number every stratum's pixels in the same scan order, take the drawn ranks
    order = []
    for win in iter_windows(*data.shape, BLOCK):
        rows, cols = win_slices(win)
        rr, cc = np.mgrid[rows, cols]
        order.append(np.stack([rr.ravel(), cc.ravel()], 1))
    scan = np.concatenate(order)
    for h, code in enumerate(codes):
        mine = scan[data[scan[:, 0], scan[:, 1]] == code][ranks[h]]
        got = picked[picked["stratum"] == h][["row", "col"]].to_numpy()
        assert sorted(map(tuple, got)) == sorted(map(tuple, mine))
    assert (draw_ranks(sizes, [40, 40, 40], seed=5)[2] == ranks[2]).all()  # reproducible


def test_design_points_sit_on_their_stratum_and_follow_the_allocation(tmp_path):
    cfg = _config(tmp_path, min_per_class=30, target_se=0.02)
    path, data = _mosaic(tmp_path, cfg)
    out = tmp_path / "acc"
    d = design_sample(cfg, path, out / "s.gpkg", out / "s.csv", out / "d.json")
    pts = pyogrio.read_dataframe(out / "s.gpkg")
    assert len(pts) == d["n"] == pd.read_csv(out / "s.csv").shape[0]
    # (0.4 / 0.02)^2 = 400 points: 30 per class, the other 310 by area (the rare class's 1 %: 3)
    assert d["n_formula"] == 400 and sum(s["points"] for s in d["strata"]) == 400
    by = {s["code"]: s for s in d["strata"]}
    rare = by[cfg.class_codes[2]]
    assert rare["points"] == 30 + round(310 * rare["weight"]) == 33 and by[cfg.class_codes[5]]["points"] == 0
    cols = ((pts["x"] - 399960) // 10).astype(int)
    rows = ((4800000 - pts["y"]) // 10).astype(int)
    assert (data[rows, cols] == pts["stratum"]).all()  # every point on a pixel of its stratum
    assert pts["reference"].isna().all() and pts["id"].is_unique
    assert json.loads((out / "d.json").read_text())["seed"] == cfg.seed


def _labelled(tmp_path, cfg):
    path, data = _mosaic(tmp_path, cfg)
    out = tmp_path / "acc"
    design_sample(cfg, path, out / "s.gpkg", out / "s.csv", out / "d.json")
    pts = pd.read_csv(out / "s.csv")
    pts["reference"] = pts["stratum"]  # a perfect map
    return path, out, pts


def test_a_perfect_map_estimates_its_own_areas_with_no_error(tmp_path):
    cfg = _config(tmp_path, min_per_class=30, target_se=0.02)
    path, out, pts = _labelled(tmp_path, cfg)
    pts.to_csv(out / "l.csv", index=False)
    res = estimate_stage(cfg, out / "d.json", out / "s.csv", out / "l.csv", {"rf": path}, out / "e.json")
    r = res["classifiers"]["rf"]
    assert r["strata_are_map_classes"] and r["overall_accuracy"]["value"] == 1.0
    assert r["overall_accuracy"]["se"] == 0.0
    name = cfg.classes[2].name
    assert r["per_class"][name]["area_ha"]["value"] == pytest.approx(r["per_class"][name]["mapped_area_ha"])
    assert (out / "e.csv").exists()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: pd.concat([d, d.iloc[:1]]), "1 duplicate ids"),
        (lambda d: d.assign(id=d["id"] + 10_000), "ids not in the sampling design"),
        (
            lambda d: d.assign(stratum=d["stratum"].where(d.index != 3, 999)),
            "1 points with another stratum than designed",
        ),
        (lambda d: d.assign(reference=d["reference"].where(d.index != 2, 77)), "reference codes \\[77\\]"),
        (lambda d: d.assign(reference=d["reference"].astype("Int64").where(d.index > 4)), "5 points without"),
        (lambda d: d.drop(columns="reference"), "no 'reference' field"),
        (
            lambda d: d.assign(reference=d["reference"].astype(object).where(d.index != 1, "forest")),
            "not class codes",
        ),
        (lambda d: d.assign(reference=d["reference"].astype(float).where(d.index != 1, 11.5)), "non-integer"),
    ],
)
def test_labelled_samples_that_do_not_match_the_design_are_refused(tmp_path, edit, message):
    cfg = _config(tmp_path, min_per_class=30, target_se=0.02)
    path, out, pts = _labelled(tmp_path, cfg)
    edit(pts).to_csv(out / "l.csv", index=False)
    with pytest.raises(PipelineError, match=message):
        estimate_stage(cfg, out / "d.json", out / "s.csv", out / "l.csv", {"rf": path}, out / "e.json")
    assert not (out / "e.json").exists()


def test_unlabelled_points_may_be_dropped_and_are_counted(tmp_path):
    cfg = _config(tmp_path, min_per_class=30, target_se=0.02, allow_unlabelled=True)
    path, out, pts = _labelled(tmp_path, cfg)
    pts["reference"] = pts["reference"].astype("Int64").where(pts.index > 4)
    pts.to_csv(out / "l.csv", index=False)
    res = estimate_stage(cfg, out / "d.json", out / "s.csv", out / "l.csv", {"rf": path}, out / "e.json")
    assert res["dropped_unlabelled"] == 5 and res["points"] == len(pts) - 5


def test_the_report_section_shows_the_estimates_beside_the_pixel_counts(tmp_path):
    from pipeline.layout import Layout
    from pipeline.report import sections
    from pipeline.report.html import page
    from tests.report_page import parse, table

    cfg = _config(tmp_path, min_per_class=30, target_se=0.02)
    lay = Layout(cfg.workdir)
    path, data = _mosaic(tmp_path, cfg)
    design_sample(cfg, path, lay.accuracy("points"), lay.accuracy("points_csv"), lay.accuracy("design"))
    assert "No estimates yet" in "".join(sections.accuracy_sample(cfg, lay).body)
    pts = pd.read_csv(lay.accuracy("points_csv"))
    pts["reference"] = pts["stratum"]
    pts.loc[pts.index[:10], "reference"] = cfg.class_codes[1]  # 10 points of other classes seen as class 1
    pts.to_csv(tmp_path / "l.csv", index=False)
    estimate_stage(cfg, lay.accuracy("design"), lay.accuracy("points_csv"), tmp_path / "l.csv",
                   {"rf": path, "fgunet": path}, lay.accuracy("estimates"))  # fmt: skip
    html = page("t", "s", [sections.accuracy_sample(cfg, lay)])
    doc = parse(html)
    areas = {r[0]: r for r in table(doc, "sample-areas")["rows"]}
    name = cfg.classes[1].name
    est = json.loads(lay.accuracy("estimates").read_text())["classifiers"]["rf"]["per_class"][name]
    moved = int((pts["stratum"][:10] != cfg.class_codes[1]).sum())  # class-1 labels in other strata
    assert moved > 0 and areas[name][2] == str(moved)
    assert areas[name][3] == f"{est['mapped_area_ha']:.1f}" and areas[name][5].startswith(
        f"{est['area_ha']['value']:.1f} ["
    )
    # every other mapped class was labelled only inside its own stratum: the report names them all
    # as classes whose omission the sample did not see, and not class 1
    labelled = set(pts["reference"])  # classes with reference points: an estimated area above 0
    expect = [c.name for c in cfg.classes if c.code in labelled and c.name != name]
    said = re.search(r"No reference point outside its own stratum for ([^:]*):", html).group(1).split(", ")
    assert said == expect and name not in said
    assert est["area_ha"]["value"] > est["mapped_area_ha"]  # the sample found more of class 1 than mapped
    oa = table(doc, "sample-accuracy")["rows"]
    assert [r[0] for r in oa] == ["rf", "fgunet"] and oa[0][2] == "yes" and oa[1][2] == "no (Stehman)"
    assert doc.images  # the area figure


def test_suggestions_are_the_least_certain_pixel_of_each_cell_with_the_classes_taking_turns(tmp_path):
    from pipeline.io.cog import margin_writer
    from pipeline.sampledesign import pick_suggestions, suggest_stage, uncertain_cells

    cfg = _config(tmp_path)
    path, data = _mosaic(tmp_path, cfg, shape=(300, 260))
    rng = np.random.default_rng(1)
    gap = rng.integers(0, 101, data.shape).astype(np.uint8)
    gap[data == 0] = 255
    grid = make_grid(260, 300)
    with margin_writer(tmp_path / "g.tif", grid) as sink:
        sink.write(rasterio.windows.Window(0, 0, 260, 300), gap)
    cells = uncertain_cells(path, tmp_path / "g.tif", 64)
    # brute force: every 64-px cell's lowest margin among mapped pixels, first in row-major order
    want = []
    for r0 in range(0, 300, 64):
        for c0 in range(0, 260, 64):
            g = gap[r0 : r0 + 64, c0 : c0 + 64].astype(int)
            g[(g == 255) | (data[r0 : r0 + 64, c0 : c0 + 64] == 0)] = 1 << 20
            if g.min() < 1 << 20:
                r, c = np.unravel_index(g.argmin(), g.shape)
                want.append((r0 + r, c0 + c, int(g.min())))
    assert sorted(zip(cells["row"], cells["col"], cells["margin"], strict=True)) == sorted(want)
    pick = pick_suggestions(cells, 7)
    assert len(pick) == 7 and set(pick["code"]) == set(cells["code"])  # every mapped class in turn
    first = pick.groupby("code")["margin"].min()
    assert all(first[c] == cells[cells["code"] == c]["margin"].min() for c in first.index)
    out = tmp_path / "s.gpkg"
    cfg2 = Config(
        {**cfg.data, "inference": {**cfg.data["inference"], "suggest_points": 5, "suggest_spacing": 64}}
    )
    suggest_stage(cfg2, "rf", [("T31TCJ", path, tmp_path / "g.tif")], out)
    pts = pyogrio.read_dataframe(out)
    assert len(pts) == 5 and pts["reference"].isna().all() and (pts["margin"] <= 100).all()
