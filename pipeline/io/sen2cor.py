"""ESA Sen2Cor L2A SAFE layout: read and write.

Layout (as in the real ``MTD_MSIL2A.xml`` samples)::

    S2B_MSIL2A_20190501T105039_N0211_R051_T31TCJ_20190501T140320.SAFE/
        MTD_MSIL2A.xml                         product metadata: IMAGE_FILE paths without extension
        GRANULE/L2A_T31TCJ_A000000_20190501T105039/
            MTD_TL.xml                         tile geocoding (EPSG, ULX/ULY/XDIM/YDIM per resolution)
            IMG_DATA/R10m/T31TCJ_20190501T105039_B02_10m.<ext>    B02 B03 B04 B08
            IMG_DATA/R20m/T31TCJ_20190501T105039_B05_20m.<ext>    B05 B06 B07 B8A B11 B12, SCL

Rasters: uint16 DN, 0 = no data, 65535 = saturated; reflectance = (DN + BOA_ADD_OFFSET) /
BOA_QUANTIFICATION_VALUE, the offset (-1000) existing from processing baseline 04.00 on. The
reader converts to int16 x10000 with NODATA for DN 0 and 65535.

File format: real products are JPEG2000. GDAL's JP2OpenJPEG driver can only *copy* a whole
image (no windowed writes), so the writer writes tiled DEFLATE GeoTIFFs with the same stem
(``.tif``) by default, and converts them to lossless JP2 at close when ``jp2=True`` (only for
small images: it re-reads each band whole). The reader accepts ``.jp2`` first, then ``.tif``.

Validity: SCL (20 m, nearest-upsampled) in {0 nodata, 1 saturated/defective, 3 cloud shadow,
8/9 cloud, 10 cirrus} is invalid; 11 snow and 6 water stay valid (glaciers and lakes are land
cover classes); so does any pixel with a band at nodata (after the bicubic halo).
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import rasterio
import rasterio.shutil
from affine import Affine
from rasterio.crs import CRS
from rasterio.windows import Window

from pipeline.errors import PipelineError
from pipeline.io.l2a import (
    BANDS,
    BANDS_10M,
    BANDS_20M,
    IDX_10M,
    IDX_20M,
    NODATA,
    Acquisition,
    Product,
    ProductWriterBase,
    WindowMasks,
    check_domain,
    check_raster,
    check_window_arrays,
    combine_validity,
    grid20,
    mean2x2,
    read_raster,
)
from pipeline.io.tilestore import Grid
from pipeline.resample import nearest_block, nearest_window, pad_edge, source_window, upsample_block

NAME_RE = re.compile(r"^S2[A-D]_MSIL2A_\d{8}T\d{6}_N\d{4}_R\d{3}_T[0-9A-Z]{5}_\d{8}T\d{6}\.SAFE$")
NAME_FORM = "S2X_MSIL2A_YYYYMMDDThhmmss_Nxxxx_Rxxx_Tnnnnn_YYYYMMDDThhmmss.SAFE"
METADATA = "MTD_MSIL2A.xml"  # a folder holding this is a product, whatever its name
# Sen2Cor band names and their index in the metadata's band_id lists (B1=0 ... B12=12)
S2C_NAME = {b: (f"B{int(b[1:]):02d}" if b[1:].isdigit() else b) for b in BANDS}
BAND_INDEX = {
    b: i
    for i, b in enumerate(("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B10", "B11", "B12"))
}
SCL_INVALID = (0, 1, 3, 8, 9, 10)
EXTENSIONS = (".jp2", ".tif")
DN_NODATA, DN_SATURATED = 0, 65535
SCL_MAX = 11  # classes 0 (no data) ... 11 (snow)
# What the format specifies for each file (checked when a product is opened; SCL's range per window)
DN = {"dtype": "uint16", "nodata": DN_NODATA, "spec": "Sen2Cor L2A: uint16 digital numbers, no-data 0"}
SCL = {"dtype": "uint8", "spec": "Sen2Cor SCL: uint8 classes 0-11"}


def _strip_ns(root: ET.Element) -> ET.Element:
    for el in root.iter():
        if isinstance(el.tag, str) and "}" in el.tag:
            el.tag = el.tag.split("}", 1)[1]
    return root


def _parse_xml(path: Path, what: str) -> ET.Element:
    if not path.is_file():
        raise PipelineError(path, f"{what} is missing")
    try:
        return _strip_ns(ET.parse(path).getroot())
    except ET.ParseError as exc:
        raise PipelineError(path, f"unparseable {what} XML ({exc})") from exc


def _text(root: ET.Element, name: str, path: Path) -> str:
    el = root.find(f".//{name}")
    if el is None or el.text is None or not el.text.strip():
        raise PipelineError(path, f"metadata lacks {name}")
    return el.text.strip()


@dataclass(frozen=True)
class Sen2CorMetadata:
    """What the pipeline uses from ``MTD_MSIL2A.xml``; image paths relative to the SAFE, no extension."""

    product_uri: str
    tile: str
    acquired: datetime
    platform: str
    relative_orbit: int
    baseline: str
    image_files: list[str]
    band_files: dict[str, str]  # band (B2 ... B12, SCL) -> path stem at the band's native resolution
    nodata: int
    saturated: int
    quantification: float
    offsets: dict[str, int]  # band -> BOA_ADD_OFFSET (0 before baseline 04.00)

    @property
    def granule(self) -> str:
        """``GRANULE/<granule id>``, from the image paths."""
        return "/".join(self.band_files["B2"].split("/")[:2])


def parse_mtd(mtd: Path) -> Sen2CorMetadata:
    """Parse a Sen2Cor ``MTD_MSIL2A.xml`` (stdlib ElementTree, namespaces ignored)."""
    mtd = Path(mtd)
    root = _parse_xml(mtd, "product metadata file (MTD_MSIL2A.xml)")
    uri = _text(root, "PRODUCT_URI", mtd)
    m = re.search(r"_(T[0-9A-Z]{5})_", uri)
    if not m:
        raise PipelineError(mtd, f"PRODUCT_URI {uri!r} names no tile")
    try:
        acquired = datetime.fromisoformat(_text(root, "PRODUCT_START_TIME", mtd)).astimezone(UTC)
    except ValueError as exc:
        raise PipelineError(mtd, f"bad PRODUCT_START_TIME ({exc})") from exc
    images = [(e.text or "").strip() for e in root.iterfind(".//Granule_List/Granule/IMAGE_FILE")]
    files: dict[str, str] = {}
    for band in (*BANDS, "SCL"):
        res = "10m" if band in BANDS_10M else "20m"
        suffix = f"_{S2C_NAME.get(band, band)}_{res}"
        hits = [f for f in images if f.endswith(suffix)]
        if len(hits) != 1:
            raise PipelineError(mtd, f"metadata lists {len(hits)} IMAGE_FILE entries for {band} at {res}")
        files[band] = hits[0]
    special = {
        (sv.findtext("SPECIAL_VALUE_TEXT") or "").strip(): int(sv.findtext("SPECIAL_VALUE_INDEX") or -1)
        for sv in root.iterfind(".//Special_Values")
    }
    offsets = {b: 0 for b in BANDS}
    for el in root.iterfind(".//BOA_ADD_OFFSET_VALUES_LIST/BOA_ADD_OFFSET"):
        idx = int(el.get("band_id", "-1"))
        for b, i in BAND_INDEX.items():
            if i == idx and b in offsets:
                offsets[b] = int(float(el.text or 0))
    spacecraft = _text(root, "SPACECRAFT_NAME", mtd)
    return Sen2CorMetadata(
        product_uri=uri,
        tile=m.group(1),
        acquired=acquired,
        platform=spacecraft.upper().replace("-", ""),
        relative_orbit=int(_text(root, "SENSING_ORBIT_NUMBER", mtd)),
        baseline=_text(root, "PROCESSING_BASELINE", mtd),
        image_files=images,
        band_files=files,
        nodata=special.get("NODATA", DN_NODATA),
        saturated=special.get("SATURATED", DN_SATURATED),
        quantification=float(_text(root, "BOA_QUANTIFICATION_VALUE", mtd)),
        offsets=offsets,
    )


@dataclass(frozen=True)
class TileGeocoding:
    epsg: int
    geo: dict[int, tuple[Affine, int, int]]  # resolution -> (transform, width, height)


def parse_tile_mtd(path: Path) -> TileGeocoding:
    """Tile geocoding from a granule's ``MTD_TL.xml`` (the SAFE's only georeference besides the rasters)."""
    root = _parse_xml(path, "granule metadata file (MTD_TL.xml)")
    code = _text(root, "HORIZONTAL_CS_CODE", path)
    try:
        epsg = int(code.split(":")[-1])
        sizes = {
            int(s.get("resolution", "0")): (int(s.findtext("NCOLS")), int(s.findtext("NROWS")))  # type: ignore[arg-type]
            for s in root.iterfind(".//Tile_Geocoding/Size")
        }
        geo = {}
        for g in root.iterfind(".//Tile_Geocoding/Geoposition"):
            res = int(g.get("resolution", "0"))
            t = Affine(
                float(g.findtext("XDIM")),
                0.0,
                float(g.findtext("ULX")),  # type: ignore[arg-type]
                0.0,
                float(g.findtext("YDIM")),
                float(g.findtext("ULY")),
            )  # type: ignore[arg-type]
            geo[res] = (t, *sizes[res])
    except (TypeError, ValueError, KeyError) as exc:
        raise PipelineError(path, f"bad Tile_Geocoding ({exc})") from exc
    for res in (10, 20):
        if res not in geo:
            raise PipelineError(path, f"Tile_Geocoding lacks the {res} m Size/Geoposition")
    return TileGeocoding(epsg, geo)


def _locate(stem: Path) -> Path:
    """The band file for a MTD_MSIL2A.xml entry (listed without extension): ``.jp2`` first, then ``.tif``."""
    for ext in EXTENSIONS:
        if stem.with_name(stem.name + ext).is_file():
            return stem.with_name(stem.name + ext)
    raise PipelineError(stem, f"band file listed in MTD_MSIL2A.xml is missing (no {' or '.join(EXTENSIONS)})")


def open_product(safe: Path) -> Product:
    """Parse one SAFE, its granule MTD_TL.xml, and check every raster against the tile geocoding."""
    safe = Path(safe)
    mtd = safe / "MTD_MSIL2A.xml"
    md = parse_mtd(mtd)
    if md.nodata != DN_NODATA or md.saturated != DN_SATURATED:
        raise PipelineError(mtd, f"unsupported special values NODATA={md.nodata} SATURATED={md.saturated}")
    tl = parse_tile_mtd(safe / md.granule / "MTD_TL.xml")
    crs = CRS.from_epsg(tl.epsg)
    t10, w10, h10 = tl.geo[10]
    grid = Grid(crs, t10, w10, h10)
    t20, w20, h20 = tl.geo[20]
    if (w20, h20) != (w10 // 2, h10 // 2) or not grid20(grid).transform.almost_equals(t20, precision=1e-6):
        raise PipelineError(
            safe / md.granule / "MTD_TL.xml", "20 m geocoding is not the twin of the 10 m one"
        )
    files: dict[str, Path] = {}
    for band, stem in md.band_files.items():
        files[band] = _locate(safe / stem)
        t, w, h = tl.geo[10] if band in BANDS_10M else tl.geo[20]
        check_raster(files[band], crs, t, w, h, **(SCL if band == "SCL" else DN))
    return Product(
        path=safe,
        fmt="sen2cor",
        tile=md.tile,
        acquired=md.acquired,
        product_id=md.product_uri.removesuffix(".SAFE"),
        grid=grid,
        band_files={b: files[b] for b in BANDS},
        mask_files={"SCL": files["SCL"]},
        metadata=mtd,
        platform=md.platform,
        relative_orbit=md.relative_orbit,
        offsets=md.offsets,
        quantification=md.quantification,
    )


def dn_to_reflectance(dn: np.ndarray, offset: int, quantification: float) -> np.ndarray:
    """uint16 DN -> int16 reflectance x10000; DN 0 (no data) and 65535 (saturated) -> NODATA."""
    d = dn.astype(np.float64) if quantification != 10000 else dn.astype(np.int32)
    r = (d + offset) * (10000.0 / quantification) if quantification != 10000 else d + offset
    r = np.clip(np.rint(r), NODATA + 1, np.iinfo(np.int16).max).astype(np.int16)
    r[(dn == DN_NODATA) | (dn == DN_SATURATED)] = NODATA
    return r


def scl_invalid(scl: np.ndarray) -> np.ndarray:
    """Pure Sen2Cor mask rule: nodata, saturated, shadow, clouds and cirrus are not clear observations."""
    return np.isin(scl, SCL_INVALID)


def read_window(p: Product, win: Window) -> tuple[np.ndarray, np.ndarray]:
    """All bands at 10 m (20 m ones bicubic with halo, in reflectance) and the validity of one window."""
    h, w = int(win.height), int(win.width)
    out = np.empty((len(BANDS), h, w), dtype=np.int16)
    for i, band in zip(IDX_10M, BANDS_10M, strict=True):
        out[i] = dn_to_reflectance(
            read_raster(p.band_files[band], win), p.offsets.get(band, 0), p.quantification
        )
    win20, pads = source_window(win, p.grid.height // 2, p.grid.width // 2)
    block = np.stack(
        [
            dn_to_reflectance(read_raster(p.band_files[b], win20), p.offsets.get(b, 0), p.quantification)
            for b in BANDS_20M
        ]
    )
    out[IDX_20M] = upsample_block(pad_edge(block, pads), win, NODATA)
    path = p.mask_files["SCL"]
    scl = nearest_block(check_domain(read_raster(path, nearest_window(win)), path, 0, SCL_MAX, "SCL"), win)
    return out, combine_validity(out, scl_invalid(scl))


# --------------------------------------------------------------------------------------- writer


def scl_from_masks(masks20: dict[str, np.ndarray | None], ndvi: np.ndarray) -> np.ndarray:
    """SCL class per 20 m pixel, by priority edge > saturated > cloud > shadow > snow > water > NDVI."""
    scl = np.where(ndvi > 0.3, 4, 5).astype(np.uint8)
    for key, cls in (("water", 6), ("snow", 11), ("shadow", 3), ("cloud", 9), ("saturated", 1), ("edge", 0)):
        m = masks20.get(key)
        if m is not None:
            scl[m.astype(bool)] = cls
    return scl


def _baseline_offset(baseline: str) -> int:
    return -1000 if float(baseline) >= 4.0 else 0


class Sen2CorWriter(ProductWriterBase):
    """Writes one SAFE window by window; tiled GeoTIFFs (``.tif``) unless ``jp2=True`` (converted at close).

    ``baseline`` >= "04.00" writes BOA_ADD_OFFSET -1000 and stores DN = reflectance + 1000, as real
    products do. Edge pixels are written as DN 0. Built in a temporary folder, renamed at close.
    """

    def __init__(
        self, root: Path, acq: Acquisition, baseline: str = "05.10", jp2: bool = False, block: int = 256
    ) -> None:
        if acq.grid.crs.to_epsg() is None:
            raise ValueError(f"grid CRS {acq.grid.crs} has no EPSG code (MTD_TL.xml stores one)")
        self.acq, self.baseline, self.jp2 = acq, baseline, jp2
        self.offset = _baseline_offset(baseline)
        t = acq.acquired.astimezone(UTC)
        self.stamp = f"{t:%Y%m%dT%H%M%S}"
        gen = t + timedelta(hours=3)
        sat = acq.platform.replace("SENTINEL2", "S2")
        nbase = baseline.replace(".", "")
        orbit = f"R{acq.relative_orbit:03d}"
        self.uri = f"{sat}_MSIL2A_{self.stamp}_N{nbase}_{orbit}_{acq.tile_id}_{gen:%Y%m%dT%H%M%S}.SAFE"
        # the absolute orbit (A......) is unknown to the generator: written as zeros
        self.granule = f"GRANULE/L2A_{acq.tile_id}_A000000_{self.stamp}"
        self._start(acq.grid, Path(root) / self.uri)
        try:
            g10, g20 = acq.grid, grid20(acq.grid)
            for band in (*BANDS, "SCL"):
                g = g10 if band in BANDS_10M else g20
                path = self._folder.tmp / (self.stem(band) + ".tif")
                path.parent.mkdir(parents=True, exist_ok=True)
                dtype, nodata = ("uint8", None) if band == "SCL" else ("uint16", DN_NODATA)
                self._ds[band] = rasterio.open(
                    path, "w", **g.gtiff_profile(dtype, nodata, block, compress="deflate")
                )
        except BaseException as exc:
            self._abort(exc)
            raise

    def stem(self, band: str) -> str:
        """Path of a band file relative to the SAFE, without extension (as MTD_MSIL2A.xml lists it)."""
        res = "10m" if band in BANDS_10M else "20m"
        return (
            f"{self.granule}/IMG_DATA/R{res}/{self.acq.tile_id}_{self.stamp}_{S2C_NAME.get(band, band)}_{res}"
        )

    def _dn(self, r: np.ndarray) -> np.ndarray:
        dn = np.clip(r.astype(np.int32) - self.offset, 1, DN_SATURATED - 1)
        dn[r == NODATA] = DN_NODATA
        return dn.astype(np.uint16)

    def write(self, window: Window, r10: np.ndarray, r20: np.ndarray, masks: WindowMasks) -> None:
        check_window_arrays(window, r10, r20, masks)
        r0, c0, h, w = self.tracker.add(window)
        win20 = Window(c0 // 2, r0 // 2, w // 2, h // 2)
        m20 = {
            k: None
            if getattr(masks, k) is None
            else getattr(masks, k).astype(bool).reshape(h // 2, 2, w // 2, 2).any(axis=(1, 3))
            for k in ("cloud", "shadow", "saturated", "edge", "snow", "water")
        }
        edge10 = masks.edge.astype(bool)
        for i, band in enumerate(BANDS_10M):
            dn = self._dn(r10[i])
            dn[edge10] = DN_NODATA
            self._ds[band].write(dn, 1, window=window)
        for i, band in enumerate(BANDS_20M):
            dn = self._dn(r20[i])
            dn[m20["edge"]] = DN_NODATA  # type: ignore[index]
            self._ds[band].write(dn, 1, window=win20)
        red = mean2x2(r10[BANDS_10M.index("B4")])
        nir = mean2x2(r10[BANDS_10M.index("B8")])
        with np.errstate(divide="ignore", invalid="ignore"):
            ndvi = np.nan_to_num((nir - red) / (nir + red))
        self._ds["SCL"].write(scl_from_masks(m20, ndvi), 1, window=win20)

    def _finalise(self, folder: Path) -> None:
        """Optionally convert to JP2, then write MTD_MSIL2A.xml and the granule's MTD_TL.xml."""
        if self.jp2:
            for band in (*BANDS, "SCL"):
                tif = folder / (self.stem(band) + ".tif")
                rasterio.shutil.copy(
                    tif, tif.with_suffix(".jp2"), driver="JP2OpenJPEG", REVERSIBLE="YES", QUALITY="100"
                )
                tif.unlink()
        for path, root in (
            (folder / "MTD_MSIL2A.xml", self._mtd()),
            (folder / self.granule / "MTD_TL.xml", self._mtd_tl()),
        ):
            tree = ET.ElementTree(root)
            ET.indent(tree)
            tree.write(path, encoding="UTF-8", xml_declaration=True)

    def _mtd(self) -> ET.Element:
        """MTD_MSIL2A.xml modelled on the real samples (only what a reader of the product needs)."""
        acq = self.acq
        t = acq.acquired.astimezone(UTC)
        start = f"{t:%Y-%m-%dT%H:%M:%S}.{t.microsecond // 1000:03d}Z"
        ns = "https://psd-14.sentinel2.eo.esa.int/PSD/User_Product_Level-2A.xsd"
        ET.register_namespace("n1", ns)
        root = ET.Element(f"{{{ns}}}Level-2A_User_Product")
        gi = ET.SubElement(root, f"{{{ns}}}General_Info")
        pi = ET.SubElement(gi, "Product_Info")
        for tag, val in (
            ("PRODUCT_START_TIME", start),
            ("PRODUCT_STOP_TIME", start),
            ("PRODUCT_URI", self.uri),
            ("PROCESSING_LEVEL", "Level-2A"),
            ("PRODUCT_TYPE", "S2MSI2A"),
            ("PROCESSING_BASELINE", self.baseline),
        ):
            ET.SubElement(pi, tag).text = val
        dt = ET.SubElement(pi, "Datatake")
        ET.SubElement(dt, "SPACECRAFT_NAME").text = acq.platform.replace("SENTINEL2", "Sentinel-2")
        ET.SubElement(dt, "DATATAKE_SENSING_START").text = start
        ET.SubElement(dt, "SENSING_ORBIT_NUMBER").text = str(acq.relative_orbit)
        gl = ET.SubElement(ET.SubElement(pi, "Product_Organisation"), "Granule_List")
        gr = ET.SubElement(gl, "Granule", imageFormat="JPEG2000" if self.jp2 else "GeoTIFF")
        for band in (*BANDS, "SCL"):
            ET.SubElement(gr, "IMAGE_FILE").text = self.stem(band)
        pic = ET.SubElement(gi, "Product_Image_Characteristics")
        for text, idx in (("NODATA", DN_NODATA), ("SATURATED", DN_SATURATED)):
            sv = ET.SubElement(pic, "Special_Values")
            ET.SubElement(sv, "SPECIAL_VALUE_TEXT").text = text
            ET.SubElement(sv, "SPECIAL_VALUE_INDEX").text = str(idx)
        qv = ET.SubElement(pic, "QUANTIFICATION_VALUES_LIST")
        ET.SubElement(qv, "BOA_QUANTIFICATION_VALUE", unit="none").text = "10000"
        if float(self.baseline) >= 4.0:
            ol = ET.SubElement(pic, "BOA_ADD_OFFSET_VALUES_LIST")
            for i in range(13):
                ET.SubElement(ol, "BOA_ADD_OFFSET", band_id=str(i)).text = str(self.offset)
        return root

    def _mtd_tl(self) -> ET.Element:
        """MTD_TL.xml with the Tile_Geocoding block real granules carry."""
        ns = "https://psd-14.sentinel2.eo.esa.int/PSD/S2_PDI_Level-2A_Tile_Metadata.xsd"
        ET.register_namespace("n1", ns)
        root = ET.Element(f"{{{ns}}}Level-2A_Tile_ID")
        gen = ET.SubElement(root, f"{{{ns}}}General_Info")
        ET.SubElement(gen, "TILE_ID").text = self.granule.split("/")[-1]
        tg = ET.SubElement(
            ET.SubElement(root, f"{{{ns}}}Geometric_Info"), "Tile_Geocoding", metadataLevel="Brief"
        )
        crs = self.acq.grid.crs
        ET.SubElement(tg, "HORIZONTAL_CS_NAME").text = crs.to_wkt().split('"')[1]
        ET.SubElement(tg, "HORIZONTAL_CS_CODE").text = f"EPSG:{crs.to_epsg()}"
        grids = ((10, self.acq.grid), (20, grid20(self.acq.grid)))
        for res, g in grids:
            size = ET.SubElement(tg, "Size", resolution=str(res))
            ET.SubElement(size, "NROWS").text = str(g.height)
            ET.SubElement(size, "NCOLS").text = str(g.width)
        for res, g in grids:
            gp = ET.SubElement(tg, "Geoposition", resolution=str(res))
            for tag, val in (
                ("ULX", g.transform.c),
                ("ULY", g.transform.f),
                ("XDIM", g.transform.a),
                ("YDIM", g.transform.e),
            ):
                ET.SubElement(gp, tag).text = f"{val:.15g}"
        return root
