"""A STAC catalogue of the run's products, for a portal or a plain web server.

One collection for the run; one item per tile (its class maps, confidence and validity layers) and
one item for the national product (the mosaics, their area tables, regional statistics, vector
product and the QA report). Class codes, names and colours go in the classification extension,
grids in the projection extension, and the provenance (software, config digest, input products)
in the processing extension's fields. The catalogue is self-contained with relative links and
asset hrefs (``catalog/`` beside ``maps/``, ``mosaic/``...), so the run's folder can be copied to
a web server as it is. It is built in a staging folder and renamed into place whole.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pystac
import rasterio
from pystac.extensions.classification import Classification, ClassificationExtension
from pystac.extensions.projection import ProjectionExtension
from rasterio.warp import transform_bounds, transform_geom

from pipeline.config import ClassDef, Config
from pipeline.errors import PipelineError
from pipeline.io.atomic import atomic_path
from pipeline.layout import Layout
from pipeline.report.provenance import git_commit, input_products, package_version

PROCESSING = "https://stac-extensions.github.io/processing/v1.2.0/schema.json"
COG = pystac.MediaType.COG
GPKG = "application/geopackage+sqlite3"


def classification(classes: Sequence[ClassDef]) -> list[Classification]:
    nodata = Classification.create(
        value=0, name="nodata", description="no data / not classified", nodata=True
    )
    return [nodata] + [
        Classification.create(
            value=c.code, name=c.name, description=c.label or c.name, color_hint=c.colour[1:].upper()
        )
        for c in classes
    ]


def _footprint(path: Path) -> tuple[dict[str, Any], list[float], dict[str, Any]]:
    """(WGS84 geometry, bbox, projection fields) of a raster."""
    with rasterio.open(path) as src:
        b = src.bounds
        ring = [
            (b.left, b.bottom),
            (b.right, b.bottom),
            (b.right, b.top),
            (b.left, b.top),
            (b.left, b.bottom),
        ]
        geom = transform_geom(src.crs, "EPSG:4326", {"type": "Polygon", "coordinates": [ring]}, precision=7)
        bbox = list(transform_bounds(src.crs, "EPSG:4326", *b, densify_pts=21))
        epsg = src.crs.to_epsg()
        proj = {
            "code": f"EPSG:{epsg}" if epsg else None,
            "wkt2": None if epsg else src.crs.to_wkt(),
            "shape": [src.height, src.width],
            "transform": list(src.transform)[:6],
        }
    return geom, bbox, proj


def _raster_asset(
    item: pystac.Item, key: str, path: Path, title: str, roles: list[str], classes=None
) -> None:
    asset = pystac.Asset(href=str(path.resolve()), media_type=COG, title=title, roles=roles)
    item.add_asset(key, asset)
    if classes is not None:
        ClassificationExtension.ext(asset, add_if_missing=True).apply(classes=classes)


def _file_asset(item: pystac.Item, key: str, path: Path, media: str, title: str, roles: list[str]) -> None:
    item.add_asset(key, pystac.Asset(href=str(path.resolve()), media_type=media, title=title, roles=roles))


def _item(
    item_id: str, footprint: Path, start: dt.datetime, end: dt.datetime, props: dict[str, Any]
) -> pystac.Item:
    geom, bbox, proj = _footprint(footprint)
    item = pystac.Item(
        item_id,
        geometry=geom,
        bbox=bbox,
        datetime=None,
        start_datetime=start,
        end_datetime=end,
        properties=props,
    )
    ProjectionExtension.ext(item, add_if_missing=True).apply(
        **{k: v for k, v in proj.items() if v is not None}
    )
    item.stac_extensions.append(PROCESSING)
    return item


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise PipelineError(path, f"{what} is missing (run its job first)")
    return path


def _national_assets(
    cfg: Config, lay: Layout, item: pystac.Item, m: str, classes: list[Classification]
) -> None:
    """The national item's assets of classifier ``m``: mosaics, tables, regions, vector product."""
    need = _require
    _raster_asset(item, f"{m}_classes", lay.mosaic(m), f"{m} national land-cover map", ["data"], classes)
    layers = [("confidence", "confidence (%)"), ("clear", "clear observations")]
    if cfg["inference"]["probabilities"]:
        layers.append(("margin", "uncertainty: margin of the two most probable classes (%)"))
    for layer, title in layers:
        path = need(lay.mosaic(m, layer), f"the {m} {layer} mosaic")
        _raster_asset(item, f"{m}_{layer}", path, f"{m} national {title}", ["data", "quality"])
    areas = need(lay.mosaic(m, "areas"), f"the {m} area table")
    _file_asset(item, f"{m}_areas", areas, "text/csv", f"{m} class areas (ha, counted once)", ["metadata"])
    if cfg["inputs"]["regions"]:
        table = need(lay.mosaic(m, "regions"), f"the {m} regional table")
        _file_asset(item, f"{m}_regions", table, "text/csv", f"{m} areas per region and class", ["metadata"])
        layer = need(lay.mosaic(m, "regions_layer"), f"the {m} regions layer")
        _file_asset(item, f"{m}_regions_layer", layer, GPKG, f"{m} regions with their figures", ["data"])
    vec = lay.vector_dir(m)
    index = need(vec / "index.json", f"the {m} vector product")
    _file_asset(
        item, f"{m}_vector_index", index, pystac.MediaType.JSON, f"{m} vector product index", ["metadata"]
    )
    for part in json.loads(index.read_text())["parts"]:
        title = f"{m} vector product, {part['label'] or part['name']}"
        _file_asset(item, f"{m}_vector_{part['name']}", vec / part["file"], GPKG, title, ["data"])


def build_catalogue(cfg: Config, out_dir: Path) -> Path:
    """Write the run's catalogue into ``out_dir`` (``collection.json`` and one folder per item)."""
    lay = Layout(cfg.workdir)
    classifiers = list(cfg["classifiers"])
    classes = classification(cfg.classes)
    grid = cfg["date_grid"]
    start = dt.datetime.fromisoformat(str(grid["start"])).replace(tzinfo=dt.UTC)
    end = dt.datetime.fromisoformat(str(grid["end"])).replace(tzinfo=dt.UTC)
    software = {"landcover-pipeline": package_version()}
    commit = git_commit()
    common = {
        "processing:level": "L4",
        "processing:software": software,
        "processing:lineage": (
            "Sentinel-2 L2A time series gapfilled onto a regular date grid, normalised by run-wide"
            " 3rd/97th percentiles, classified per pixel or per patch (Stoian et al. 2019), validated"
            " on held-out reference polygons"
        ),
        "landcover:config_digest": cfg.digest,
        "landcover:commit": commit,
        "landcover:classifiers": classifiers,
    }
    items: list[pystac.Item] = []
    for tile in cfg.tiles:
        validity = _require(lay.validity(tile), f"tile {tile}: the validity layer")
        products = input_products(lay, tile)
        props = dict(common) | {"landcover:tile": tile}
        if products:
            props["landcover:input_products"] = [p["product"] for p in products["products"] if p["product"]]
            props["landcover:input_format"] = products["format"]
        item = _item(f"tile-{tile}", validity, start, end, props)
        for m in classifiers:
            _raster_asset(
                item, f"{m}_classes", _require(lay.class_map(m, tile), f"tile {tile}: the {m} map"),
                f"{m} land-cover map of {tile}", ["data"], classes,
            )  # fmt: skip
            conf = lay.confidence(m, tile)
            if conf.exists():
                _raster_asset(
                    item, f"{m}_confidence", conf, f"{m} confidence (%) of {tile}", ["data", "quality"]
                )
            margin = lay.margin(m, tile)
            if margin.exists():
                _raster_asset(
                    item, f"{m}_margin", margin, f"{m} uncertainty (margin, %) of {tile}", ["data", "quality"]
                )
        _raster_asset(item, "clear", validity, f"clear observations per pixel of {tile}", ["data", "quality"])
        items.append(item)

    mosaics = {m: _require(lay.mosaic(m), f"the {m} national mosaic") for m in classifiers}
    national = _item(
        "national", next(iter(mosaics.values())), start, end, dict(common) | {"landcover:tiles": cfg.tiles}
    )
    for m in classifiers:
        _national_assets(cfg, lay, national, m, classes)
    _file_asset(national, "qa_report", _require(lay.report(), "the QA report"), pystac.MediaType.HTML,
                "QA report of the run", ["overview", "metadata"])  # fmt: skip
    items.append(national)

    cat = cfg["catalogue"]
    bboxes = [i.bbox for i in items]
    extent = pystac.Extent(
        pystac.SpatialExtent(
            [
                [
                    min(b[0] for b in bboxes),
                    min(b[1] for b in bboxes),
                    max(b[2] for b in bboxes),
                    max(b[3] for b in bboxes),
                ]
            ]
        ),  # fmt: skip
        pystac.TemporalExtent([[start, end]]),
    )
    collection = pystac.Collection(
        id=cat["id"],
        title=cat["title"],
        description=cat["description"],
        extent=extent,
        license=cat["license"],
        summaries=pystac.Summaries({"landcover:classifiers": classifiers}),
    )
    ClassificationExtension.summaries(collection, add_if_missing=True).classes = classes
    for item in items:
        collection.add_item(item)
    # hrefs laid out for the final folder, written to a staging sibling at the same depth
    # (atomic_path), so the relative hrefs hold once it is renamed into place
    collection.normalize_hrefs(str(Path(out_dir).resolve()))
    collection.make_all_asset_hrefs_relative()
    with atomic_path(out_dir) as stage:
        collection.save(pystac.CatalogType.SELF_CONTAINED, dest_href=str(stage.resolve()))
    return out_dir / "collection.json"
