"""Theia/MUSCATE (MAJA) L2A layout: read and write.

Layout (as distributed by Theia, see the real ``*_MTD_ALL.xml`` samples)::

    SENTINEL2A_20180105-105435-123_L2A_T31TCJ_C_V1-4/
        <id>_MTD_ALL.xml
        <id>_FRE_B2.tif ... <id>_FRE_B12.tif      int16 x10000, nodata -10000; R1=10 m, R2=20 m
        MASKS/<id>_CLM_R1.tif, _CLM_R2.tif        cloud bit field (below)
        MASKS/<id>_SAT_R1.tif, _SAT_R2.tif        one bit per band of that resolution
        MASKS/<id>_EDG_R1.tif, _EDG_R2.tif        1 = outside the swath / no data

CLM bits (Theia MUSCATE product format): bit 0 summary (any cloud or shadow), bit 1 all clouds
except thin ones, bit 2 clouds from mono-temporal tests, bit 3 multi-temporal, bit 4 thin clouds,
bit 5 shadows of detected clouds, bit 6 shadows of clouds outside the image, bit 7 high clouds.
Only the MTD tells which file is which; the reader trusts it (file names relative to the folder)
and checks every file against the MTD's R1/R2 geopositioning.

Validity (10 m): CLM_R1 == 0, no SAT_R1 bit, no SAT_R2 bit (nearest-upsampled), EDG_R1 and
EDG_R2 (nearest) clear, and no band at nodata after the bicubic (whose 4x4 support spreads a
20 m nodata pixel to its 10 m neighbours).
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import rasterio
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
    any2x2,
    check_domain,
    check_raster,
    check_window_arrays,
    combine_validity,
    grid20,
    read_raster,
)
from pipeline.io.tilestore import Grid
from pipeline.resample import nearest_block, nearest_window, pad_edge, source_window, upsample_block

NAME_RE = re.compile(r"^SENTINEL2[A-D]_\d{8}-\d{6}-\d{3}_L2A_T[0-9A-Z]{5}_[A-Z]_V\d+-\d+$")
NAME_FORM = "SENTINEL2X_YYYYMMDD-hhmmss-sss_L2A_Tnnnnn_C_Vx-y"
METADATA = "*_MTD_ALL.xml"  # a folder holding this is a product, whatever its name
MASK_NATURES = {"Cloud": "CLM", "Saturation": "SAT", "Edge": "EDG"}
CLM_CLOUD = 0b0000_0111  # summary + all clouds + mono-temporal
CLM_SHADOW = 0b0010_0001  # summary + shadows of detected clouds
# What the format specifies for each file (checked when a product is opened, and per window)
REFLECTANCE = {
    "dtype": "int16",
    "nodata": NODATA,
    "spec": "Theia FRE: int16 reflectance x 10000, no-data -10000",
}
MASK = {"dtype": "uint8", "spec": "Theia MASKS: uint8"}


@dataclass(frozen=True)
class GroupGeo:
    ulx: float
    uly: float
    xdim: float
    ydim: float
    nrows: int
    ncols: int

    @property
    def transform(self) -> Affine:
        return Affine(self.xdim, 0.0, self.ulx, 0.0, self.ydim, self.uly)


@dataclass(frozen=True)
class TheiaMetadata:
    """What the pipeline uses from ``*_MTD_ALL.xml``; file names are relative to the product folder."""

    product_id: str
    tile: str
    acquired: datetime
    platform: str
    orbit_number: int | None
    orbit_type: str | None
    epsg: int
    geo: dict[str, GroupGeo]  # "R1", "R2" (and "R3" when present)
    fre_files: dict[str, str]  # band -> file
    mask_files: dict[str, dict[str, str]]  # "CLM" -> {"R1": file, "R2": file}
    quantification: float
    nodata: float

    @property
    def relative_orbit(self) -> int | None:
        """Relative orbit: stored as such by our writer, derived from the absolute orbit otherwise."""
        if self.orbit_number is None:
            return None
        if self.orbit_type == "Relative":
            return self.orbit_number
        # absolute -> relative (143 orbits per cycle); offsets checked on real product names
        shift = {"SENTINEL2A": 2, "SENTINEL2B": -27}.get(self.platform)
        return None if shift is None else (self.orbit_number + shift) % 143 + 1


def _text(root: ET.Element, path: str, mtd: Path) -> str:
    el = root.find(path)
    if el is None or el.text is None or not el.text.strip():
        raise PipelineError(mtd, f"metadata lacks {path.split('/')[-1]}")
    return el.text.strip()


def parse_mtd(mtd: Path) -> TheiaMetadata:
    """Parse a Theia ``MTD_ALL.xml`` (stdlib ElementTree; errors name the file)."""
    mtd = Path(mtd)
    if not mtd.is_file():
        raise PipelineError(mtd, "product metadata file (MTD_ALL.xml) is missing")
    try:
        root = ET.parse(mtd).getroot()
    except ET.ParseError as exc:
        raise PipelineError(mtd, f"unparseable metadata XML ({exc})") from exc
    if root.tag != "Muscate_Metadata_Document":
        raise PipelineError(mtd, f"not a Muscate_Metadata_Document (root <{root.tag}>)")
    pc = "Product_Characteristics"
    product_id = _text(root, f"{pc}/PRODUCT_ID", mtd)
    tile = _text(root, "Dataset_Identification/GEOGRAPHICAL_ZONE", mtd)
    try:
        acquired = datetime.fromisoformat(_text(root, f"{pc}/ACQUISITION_DATE", mtd)).astimezone(UTC)
    except ValueError as exc:
        raise PipelineError(mtd, f"bad ACQUISITION_DATE ({exc})") from exc
    orbit_el = root.find(f"{pc}/ORBIT_NUMBER")
    orbit = int(orbit_el.text) if orbit_el is not None and orbit_el.text else None
    geo: dict[str, GroupGeo] = {}
    for g in root.iterfind(".//Group_Geopositioning_List/Group_Geopositioning"):
        try:
            geo[g.get("group_id", "")] = GroupGeo(
                float(g.findtext("ULX")),
                float(g.findtext("ULY")),  # type: ignore[arg-type]
                float(g.findtext("XDIM")),
                float(g.findtext("YDIM")),  # type: ignore[arg-type]
                int(g.findtext("NROWS")),
                int(g.findtext("NCOLS")),  # type: ignore[arg-type]
            )
        except (TypeError, ValueError) as exc:
            raise PipelineError(mtd, f"bad Group_Geopositioning {g.get('group_id')} ({exc})") from exc
    for gid in ("R1", "R2"):
        if gid not in geo:
            raise PipelineError(mtd, f"metadata lacks Group_Geopositioning {gid}")
    fre: dict[str, str] = {}
    for image in root.iterfind(".//Image_List/Image"):
        if image.findtext("Image_Properties/NATURE") == "Flat_Reflectance":
            for f in image.iterfind("Image_File_List/IMAGE_FILE"):
                fre[f.get("band_id", "")] = (f.text or "").strip()
    masks: dict[str, dict[str, str]] = {}
    for mask in root.iterfind(".//Mask_List/Mask"):
        key = MASK_NATURES.get(mask.findtext("Mask_Properties/NATURE") or "")
        if key:
            for f in mask.iterfind("Mask_File_List/MASK_FILE"):
                masks.setdefault(key, {})[f.get("group_id", "")] = (f.text or "").strip()
    nodata = None
    for sv in root.iterfind("Radiometric_Informations/Special_Values_List/SPECIAL_VALUE"):
        if sv.get("name") == "nodata":
            nodata = float(sv.text or "nan")
    return TheiaMetadata(
        product_id=product_id,
        tile=tile,
        acquired=acquired,
        platform=_text(root, f"{pc}/PLATFORM", mtd),
        orbit_number=orbit,
        orbit_type=None if orbit_el is None else orbit_el.get("type"),
        epsg=int(_text(root, ".//Horizontal_Coordinate_System/HORIZONTAL_CS_CODE", mtd)),
        geo=geo,
        fre_files=fre,
        mask_files=masks,
        quantification=float(_text(root, "Radiometric_Informations/REFLECTANCE_QUANTIFICATION_VALUE", mtd)),
        nodata=float("nan") if nodata is None else nodata,
    )


def open_product(folder: Path) -> Product:
    """Parse one product folder and check that every file it needs exists and is georeferenced as said."""
    folder = Path(folder)
    mtd = folder / f"{folder.name}_MTD_ALL.xml"
    if not mtd.is_file():
        found = sorted(folder.glob("*_MTD_ALL.xml"))
        mtd = found[0] if len(found) == 1 else mtd
    md = parse_mtd(mtd)
    if md.quantification != 10000 or md.nodata != NODATA:
        raise PipelineError(
            mtd,
            f"unsupported quantification {md.quantification} / nodata {md.nodata} "
            f"(expected 10000 / {NODATA})",
        )
    crs = CRS.from_epsg(md.epsg)
    r1, r2 = md.geo["R1"], md.geo["R2"]
    grid = Grid(crs, r1.transform, r1.ncols, r1.nrows)
    if (r2.ncols, r2.nrows) != (r1.ncols // 2, r1.nrows // 2) or not grid20(grid).transform.almost_equals(
        r2.transform, precision=1e-6
    ):
        raise PipelineError(mtd, "R2 geopositioning is not the 20 m twin of R1")
    bands: dict[str, Path] = {}
    for band in BANDS:
        if band not in md.fre_files:
            raise PipelineError(mtd, f"metadata lists no FRE image for band {band}")
        bands[band] = folder / md.fre_files[band]
        geo = r1 if band in BANDS_10M else r2
        check_raster(bands[band], crs, geo.transform, geo.ncols, geo.nrows, **REFLECTANCE)
    masks: dict[str, Path] = {}
    for key in ("CLM", "SAT", "EDG"):
        for gid, geo in (("R1", r1), ("R2", r2)):
            name = md.mask_files.get(key, {}).get(gid)
            if not name:
                raise PipelineError(mtd, f"metadata lists no {key} mask for {gid}")
            masks[f"{key}_{gid}"] = folder / name
            check_raster(masks[f"{key}_{gid}"], crs, geo.transform, geo.ncols, geo.nrows, **MASK)
    return Product(
        path=folder,
        fmt="theia",
        tile=md.tile,
        acquired=md.acquired,
        product_id=md.product_id,
        grid=grid,
        band_files=bands,
        mask_files=masks,
        metadata=mtd,
        platform=md.platform,
        relative_orbit=md.relative_orbit,
    )


def theia_invalid(
    clm_r1: np.ndarray, sat_r1: np.ndarray, sat_r2_up: np.ndarray, edg_r1: np.ndarray, edg_r2_up: np.ndarray
) -> np.ndarray:
    """Pure Theia mask rule at 10 m: any cloud/shadow bit, any saturation bit, edge at either resolution."""
    return (clm_r1 != 0) | (sat_r1 != 0) | (sat_r2_up != 0) | (edg_r1 != 0) | (edg_r2_up != 0)


def read_window(p: Product, win: Window) -> tuple[np.ndarray, np.ndarray]:
    """All bands at 10 m (20 m ones bicubic with halo) and the validity of one window."""
    h, w = int(win.height), int(win.width)
    h20, w20 = p.grid.height // 2, p.grid.width // 2
    out = np.empty((len(BANDS), h, w), dtype=np.int16)
    for i, band in zip(IDX_10M, BANDS_10M, strict=True):
        out[i] = _reflectance(p.band_files[band], win)
    win20, pads = source_window(win, h20, w20)
    block = np.stack([_reflectance(p.band_files[b], win20) for b in BANDS_20M])
    out[IDX_20M] = upsample_block(pad_edge(block, pads), win, NODATA)
    nw = nearest_window(win)
    invalid = theia_invalid(
        read_raster(p.mask_files["CLM_R1"], win),
        read_raster(p.mask_files["SAT_R1"], win),
        nearest_block(read_raster(p.mask_files["SAT_R2"], nw), win),
        _edge(p.mask_files["EDG_R1"], win),
        nearest_block(_edge(p.mask_files["EDG_R2"], nw), win),
    )
    return out, combine_validity(out, invalid)


def _reflectance(path: Path, win: Window) -> np.ndarray:
    return check_domain(read_raster(path, win), path, NODATA, 32767, "Theia FRE reflectance x 10000")


def _edge(path: Path, win: Window) -> np.ndarray:
    return check_domain(read_raster(path, win), path, 0, 1, "the Theia edge mask EDG (0 or 1)")


# --------------------------------------------------------------------------------------- writer


def product_id(acq: Acquisition) -> str:
    t = acq.acquired.astimezone(UTC)
    stamp = f"{t:%Y%m%d-%H%M%S}-{t.microsecond // 1000:03d}"
    return f"{acq.platform}_{stamp}_L2A_{acq.tile_id}_C_V1-4"


class TheiaWriter(ProductWriterBase):
    """Writes one Theia product window by window (tiled GeoTIFFs created up front, nothing held in memory).

    The product is built in a temporary sibling folder and renamed into place by :meth:`close`;
    on an exception inside ``with`` nothing is left.
    """

    def __init__(self, root: Path, acq: Acquisition, block: int = 256) -> None:
        if acq.grid.crs.to_epsg() is None:
            raise ValueError(f"grid CRS {acq.grid.crs} has no EPSG code (the MTD stores one)")
        self.acq = acq
        self.id = product_id(acq)
        self._start(acq.grid, Path(root) / self.id)
        try:
            tmp = self._folder.tmp
            (tmp / "MASKS").mkdir()
            g10, g20 = acq.grid, grid20(acq.grid)
            for band in BANDS:
                g = g10 if band in BANDS_10M else g20
                self._ds[band] = rasterio.open(
                    tmp / self.fre_name(band),
                    "w",
                    **g.gtiff_profile("int16", NODATA, block, compress="deflate"),
                )
            for key in ("CLM", "SAT", "EDG"):
                for gid, g in (("R1", g10), ("R2", g20)):
                    path = tmp / self.mask_name(key, gid)
                    self._ds[f"{key}_{gid}"] = rasterio.open(
                        path, "w", **g.gtiff_profile("uint8", None, block, compress="deflate")
                    )
        except BaseException as exc:
            self._abort(exc)
            raise

    def fre_name(self, band: str) -> str:
        return f"{self.id}_FRE_{band}.tif"

    def mask_name(self, key: str, gid: str) -> str:
        return f"MASKS/{self.id}_{key}_{gid}.tif"

    def write(self, window: Window, r10: np.ndarray, r20: np.ndarray, masks: WindowMasks) -> None:
        """Write one 10 m window (even offsets/sizes); edge pixels become nodata as in real products."""
        check_window_arrays(window, r10, r20, masks)
        r0, c0, h, w = self.tracker.add(window)
        win20 = Window(c0 // 2, r0 // 2, w // 2, h // 2)
        edge10 = masks.edge.astype(bool)
        edge20 = any2x2(edge10)
        r10 = np.where(edge10, NODATA, r10).astype(np.int16)
        r20 = np.where(edge20, NODATA, r20).astype(np.int16)
        for i, band in enumerate(BANDS_10M):
            self._ds[band].write(r10[i], 1, window=window)
        for i, band in enumerate(BANDS_20M):
            self._ds[band].write(r20[i], 1, window=win20)
        cloud, shadow, sat = masks.cloud.astype(bool), masks.shadow.astype(bool), masks.saturated.astype(bool)
        for gid, win, f in (("R1", window, lambda m: m), ("R2", win20, any2x2)):
            nbits = len(BANDS_10M) if gid == "R1" else len(BANDS_20M)
            clm = np.where(f(cloud), CLM_CLOUD, 0) | np.where(f(shadow), CLM_SHADOW, 0)
            self._ds[f"CLM_{gid}"].write(clm.astype(np.uint8), 1, window=win)
            self._ds[f"SAT_{gid}"].write(
                np.where(f(sat), (1 << nbits) - 1, 0).astype(np.uint8), 1, window=win
            )
            self._ds[f"EDG_{gid}"].write(f(edge10).astype(np.uint8), 1, window=win)

    def _finalise(self, folder: Path) -> None:
        tree = ET.ElementTree(self._mtd())
        ET.indent(tree)
        tree.write(folder / f"{self.id}_MTD_ALL.xml", encoding="UTF-8", xml_declaration=True)

    def _mtd(self) -> ET.Element:
        """A Muscate_Metadata_Document with the elements real products carry and the reader needs."""
        acq, pid = self.acq, self.id
        t = acq.acquired.astimezone(UTC)
        stamp = f"{t:%Y-%m-%dT%H:%M:%S}.{t.microsecond // 1000:03d}Z"
        root = ET.Element("Muscate_Metadata_Document")
        mi = ET.SubElement(root, "Metadata_Identification")
        ET.SubElement(mi, "METADATA_FORMAT", version="1.16").text = "METADATA_MUSCATE"
        di = ET.SubElement(root, "Dataset_Identification")
        ET.SubElement(di, "IDENTIFIER").text = pid.rsplit("_", 1)[0]
        ET.SubElement(di, "AUTHORITY").text = "THEIA"
        ET.SubElement(di, "PRODUCER").text = "MUSCATE"
        ET.SubElement(di, "PROJECT").text = "SENTINEL2"
        ET.SubElement(di, "GEOGRAPHICAL_ZONE", type="Tile").text = acq.tile_id
        pc = ET.SubElement(root, "Product_Characteristics")
        ET.SubElement(pc, "PRODUCT_ID").text = pid
        ET.SubElement(pc, "ACQUISITION_DATE").text = stamp
        ET.SubElement(pc, "PRODUCT_VERSION").text = "1.4"
        ET.SubElement(pc, "PRODUCT_LEVEL").text = "L2A"
        ET.SubElement(pc, "PLATFORM").text = acq.platform
        # real products give the absolute orbit (type="Orbit"); we only know the relative one
        ET.SubElement(pc, "ORBIT_NUMBER", type="Relative").text = str(acq.relative_orbit)
        bgl = ET.SubElement(pc, "Band_Global_List", count=str(len(BANDS)))
        for b in BANDS:
            ET.SubElement(bgl, "BAND_ID").text = b
        bgr = ET.SubElement(pc, "Band_Group_List")
        for gid, bands in (("R1", BANDS_10M), ("R2", BANDS_20M)):
            bl = ET.SubElement(ET.SubElement(bgr, "Group", group_id=gid), "Band_List", count=str(len(bands)))
            for b in bands:
                ET.SubElement(bl, "BAND_ID").text = b
        mp = ET.SubElement(ET.SubElement(root, "Product_Organisation"), "Muscate_Product")
        image = ET.SubElement(ET.SubElement(mp, "Image_List"), "Image")
        props = ET.SubElement(image, "Image_Properties")
        for tag, val in (
            ("NATURE", "Flat_Reflectance"),
            ("FORMAT", "image/tiff"),
            ("ENCODING", "int16"),
            ("ENDIANNESS", "LittleEndian"),
            ("COMPRESSION", "DEFLATE"),
        ):
            ET.SubElement(props, tag).text = val
        files = ET.SubElement(image, "Image_File_List")
        for b in BANDS:
            ET.SubElement(files, "IMAGE_FILE", band_id=b).text = self.fre_name(b)
        ml = ET.SubElement(mp, "Mask_List")
        for nature, key in MASK_NATURES.items():
            mask = ET.SubElement(ml, "Mask")
            mprops = ET.SubElement(mask, "Mask_Properties")
            ET.SubElement(mprops, "NATURE").text = nature
            ET.SubElement(mprops, "FORMAT").text = "image/tiff"
            ET.SubElement(mprops, "ENCODING").text = "byte"
            mfl = ET.SubElement(mask, "Mask_File_List")
            for gid, nb in (("R1", len(BANDS_10M)), ("R2", len(BANDS_20M))):
                nbits = {"CLM": 8, "SAT": nb, "EDG": 0}[key]
                if nbits == 0:
                    ET.SubElement(mfl, "MASK_FILE", group_id=gid).text = self.mask_name(key, gid)
                for bit in range(1, nbits + 1):
                    ET.SubElement(
                        mfl, "MASK_FILE", band_number="1", group_id=gid, bit_number=str(bit)
                    ).text = self.mask_name(key, gid)
        gi = ET.SubElement(root, "Geoposition_Informations")
        hcs = ET.SubElement(ET.SubElement(gi, "Coordinate_Reference_System"), "Horizontal_Coordinate_System")
        ET.SubElement(hcs, "HORIZONTAL_CS_TYPE").text = "PROJECTED"
        ET.SubElement(hcs, "HORIZONTAL_CS_NAME").text = acq.grid.crs.to_wkt().split('"')[1]
        ET.SubElement(hcs, "HORIZONTAL_CS_CODE").text = str(acq.grid.crs.to_epsg())
        ggl = ET.SubElement(ET.SubElement(gi, "Geopositioning"), "Group_Geopositioning_List")
        for gid, g in (("R1", acq.grid), ("R2", grid20(acq.grid))):
            gg = ET.SubElement(ggl, "Group_Geopositioning", group_id=gid)
            for tag, val in (
                ("ULX", g.transform.c),
                ("ULY", g.transform.f),
                ("XDIM", g.transform.a),
                ("YDIM", g.transform.e),
                ("NROWS", g.height),
                ("NCOLS", g.width),
            ):
                ET.SubElement(gg, tag).text = f"{val:.15g}"
        ri = ET.SubElement(root, "Radiometric_Informations")
        ET.SubElement(ri, "REFLECTANCE_QUANTIFICATION_VALUE").text = "10000"
        sv = ET.SubElement(ri, "Special_Values_List")
        ET.SubElement(sv, "SPECIAL_VALUE", name="nodata").text = str(NODATA)
        return root
