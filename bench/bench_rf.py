"""Benchmark: the pipeline's RF vs Orfeo ToolBox's (OpenCV) and scikit-learn's on the same data.

Fit on 50,000 samples x 330 features (33 dates x 10 bands), 17 classes; predict a 1024 x 1024 px
image of 330 features. Same parameters on both sides (100 trees, depth 20, no split below 10
samples, sqrt(F) features per split; OTB's early stop on OOB error disabled with ``rf.acc 0`` so it
grows all 100 trees). Synthetic class-conditional data, overlapping enough that trees grow deep like
on real land cover. Prints one JSON line per measurement. ``--quick``: 10,000 samples, 256 x 256 px.

OTB is timed end to end (process start, reading its inputs, writing its outputs): that is what a
production chain calling ``otbcli_*`` pays. Ours is timed on in-memory arrays (fit: the sklearn fit;
predict: ``RandomForest.predict`` = normalised features -> codes), and separately with the GTiff
read, for a like-for-like figure. Goals: fit <= 1/3 of OTB's time, predict >= 10x OTB's px/s.
scikit-learn's RF (same parameters, same threads) is fitted too: the peer for the fit time and for
accuracy, and the oracle for the compiled kernel (its forest converted with ``Forest.from_sklearn``
must give sklearn's ``predict_proba`` bit for bit on a 20,000 px subset).

National sample sizes (issue 15): ``--samples 500000`` (the seed's national sample is of that
order, x 330 features) and ``--otb-timeout`` to stop OTB's fit where it cannot finish (reported as
such, not as a time).

    python bench/bench_rf.py [--quick] [--samples N] [--side PX] [--threads N] [--workdir DIR]
                             [--skip-otb] [--otb-timeout S]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from pipeline.models.forest import Forest
from pipeline.models.rf import RandomForest

N_CLASSES, N_FEATURES = 17, 330
PARAMS = {"n_estimators": 100, "max_depth": 20, "min_samples_split": 10}


def peak_rss_mib() -> int:
    """This process's peak resident memory so far (Linux: ru_maxrss in KiB)."""
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def emit(**rec: object) -> None:
    print(json.dumps({"bench": "rf", **rec}), flush=True)


def make_data(n_samples: int, side: int, seed: int = 0) -> tuple[np.ndarray, ...]:
    """Class means per feature plus noise, clipped to [0, 1] like eq.-2-normalised features."""
    rng = np.random.default_rng(seed)
    means = rng.uniform(0.3, 0.7, (N_CLASSES, N_FEATURES)).astype(np.float32)
    codes = np.arange(1, N_CLASSES + 1, dtype=np.uint8)

    def draw(labels: np.ndarray) -> np.ndarray:
        x = means[labels - 1] + rng.normal(0, 0.25, (labels.size, N_FEATURES)).astype(np.float32)
        return np.clip(x, 0, 1, out=x)

    y = np.repeat(codes, -(-n_samples // N_CLASSES))[:n_samples]
    x = draw(y)
    blocks = rng.integers(1, N_CLASSES + 1, (side // 32 + 1, side // 32 + 1)).astype(np.uint8)
    truth = np.kron(blocks, np.ones((32, 32), np.uint8))[:side, :side]
    image = draw(truth.ravel())
    return x, y, image, truth


def fit_ours(x: np.ndarray, y: np.ndarray, threads: int) -> tuple[RandomForest, float]:
    rf = RandomForest(**PARAMS, n_jobs=threads, random_state=0)
    t = time.perf_counter()
    rf.fit(x, y)
    return rf, time.perf_counter() - t


def fit_sklearn(x: np.ndarray, y: np.ndarray, threads: int) -> tuple[object, float]:
    from sklearn.ensemble import RandomForestClassifier

    sk = RandomForestClassifier(**PARAMS, max_features="sqrt", n_jobs=threads, random_state=0)
    t = time.perf_counter()
    sk.fit(x, y)
    t = time.perf_counter() - t
    sk.set_params(n_jobs=1)  # threaded predict_proba sums trees in completion order: not reproducible
    return sk, t


def predict_ours(rf: RandomForest, image: np.ndarray, threads: int) -> tuple[np.ndarray, float]:
    rf.set_threads(threads)
    t = time.perf_counter()
    pred = rf.predict(image)
    return pred, time.perf_counter() - t


def write_vector(path: Path, x: np.ndarray, y: np.ndarray) -> None:
    import geopandas as gpd
    import pandas as pd
    from shapely import points

    cols = {f"f{i}": x[:, i].astype(np.float64) for i in range(x.shape[1])}
    df = pd.DataFrame(cols)
    df["class"] = y.astype(np.int32)
    gdf = gpd.GeoDataFrame(
        df, geometry=points(np.arange(len(y)) % 1000, np.arange(len(y)) // 1000), crs=32631
    )
    gdf.to_file(path, driver="GPKG", engine="pyogrio")


def write_image(path: Path, image: np.ndarray, side: int) -> None:
    import rasterio
    from affine import Affine

    cube = image.reshape(side, side, N_FEATURES).transpose(2, 0, 1)
    profile = {"driver": "GTiff", "width": side, "height": side, "count": N_FEATURES, "dtype": "float32"}
    profile |= {"tiled": True, "blockxsize": 256, "blockysize": 256, "interleave": "pixel", "bigtiff": "yes"}
    with rasterio.open(path, "w", crs="EPSG:32631", transform=Affine(10, 0, 0, 0, -10, 0), **profile) as dst:
        dst.write(cube)


def run(cmd: list[str], env: dict[str, str], timeout: float | None = None) -> float:
    t = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if res.returncode:
        raise SystemExit(f"{cmd[0]} failed:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}")
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--skip-otb", action="store_true")
    ap.add_argument("--samples", type=int, default=0, help="training samples (default 50,000; quick 10,000)")
    ap.add_argument(
        "--side", type=int, default=0, help="predicted image side in px (default 1024; quick 256)"
    )
    ap.add_argument("--otb-timeout", type=float, default=None, help="stop OTB's fit after this many seconds")
    args = ap.parse_args()
    n_samples, side = (10_000, 256) if args.quick else (50_000, 1024)
    n_samples, side = args.samples or n_samples, args.side or side
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_rf_"))
    work.mkdir(parents=True, exist_ok=True)
    emit(
        event="setup",
        samples=n_samples,
        features=N_FEATURES,
        classes=N_CLASSES,
        pixels=side * side,
        threads=args.threads,
        params=PARAMS,
        cpu=platform.processor() or platform.machine(),
        nproc=os.cpu_count(),
    )
    x, y, image, truth = make_data(n_samples, side)

    t = time.perf_counter()
    fit_ours(x[:500], y[:500], 1)  # load (or compile) the numba kernels: once per process
    emit(event="jit_warmup", seconds=round(time.perf_counter() - t, 2))
    rss0 = peak_rss_mib()
    rf, t_fit = fit_ours(x, y, args.threads)
    forest = rf.forest
    assert forest is not None
    emit(
        event="fit",
        impl="pipeline",
        seconds=round(t_fit, 2),
        peak_rss_mib=peak_rss_mib(),
        peak_rss_before_mib=rss0,
        mean_tree_depth=round(float(forest.depths.mean()), 1),
        nodes_per_tree=round(len(forest.nodes) / forest.n_trees),
    )
    sk, t_sk_fit = fit_sklearn(x, y, args.threads)
    emit(
        event="fit",
        impl="sklearn",
        seconds=round(t_sk_fit, 2),
        peak_rss_mib=peak_rss_mib(),  # the process's peak so far: ours, then sklearn's if higher
        mean_tree_depth=round(float(np.mean([e.get_depth() for e in sk.estimators_])), 1),
        nodes_per_tree=round(float(np.mean([e.tree_.node_count for e in sk.estimators_]))),
    )
    emit(event="fit_ratio_sklearn", ours_over_sklearn=round(t_fit / t_sk_fit, 3))
    sub = image[:20_000]
    t = time.perf_counter()
    ref = sk.predict_proba(sub)
    t_sk = time.perf_counter() - t
    emit(
        event="predict_subset",
        impl="sklearn.predict_proba",
        pixels=len(sub),
        px_per_s=round(len(sub) / t_sk),
        compiled_identical=bool(np.array_equal(Forest.from_sklearn(sk).run(sub, args.threads, True), ref)),
    )
    _, t_pred1 = predict_ours(rf, image, 1)
    emit(
        event="predict",
        impl="compiled",
        threads=1,
        seconds=round(t_pred1, 2),
        px_per_s=round(side * side / t_pred1),
    )
    ours, t_pred = predict_ours(rf, image, args.threads)
    emit(
        event="predict",
        impl="compiled",
        threads=args.threads,
        seconds=round(t_pred, 2),
        px_per_s=round(side * side / t_pred),
        accuracy=round(float((ours == truth.ravel()).mean()), 4),
        sklearn_accuracy=round(float((sk.predict(image) == truth.ravel()).mean()), 4),
    )

    otb_train, otb_cls = shutil.which("otbcli_TrainVectorClassifier"), shutil.which("otbcli_ImageClassifier")
    if args.skip_otb or not (otb_train and otb_cls):
        emit(event="otb", skipped=True, reason="--skip-otb" if args.skip_otb else "otbcli_* not on PATH")
        return
    env = dict(os.environ, ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=str(args.threads), OTB_LOGGER_LEVEL="WARNING")
    vec, img, model, out = work / "train.gpkg", work / "image.tif", work / "model.rf", work / "otb_map.tif"
    t = time.perf_counter()
    write_vector(vec, x, y)
    write_image(img, image, side)
    emit(event="otb_inputs", seconds=round(time.perf_counter() - t, 1), image_bytes=img.stat().st_size)

    feats = [f"f{i}" for i in range(N_FEATURES)]
    cmd = [otb_train, "-io.vd", str(vec), "-io.out", str(model), "-cfield", "class", "-feat", *feats]
    cmd += ["-classifier", "rf", "-classifier.rf.max", "20", "-classifier.rf.min", "10"]
    cmd += ["-classifier.rf.nbtrees", "100", "-classifier.rf.acc", "0", "-classifier.rf.var", "0"]
    cmd += ["-rand", "0", "-v", "false"]
    try:
        t_otb_fit = run(cmd, env, args.otb_timeout)
    except subprocess.TimeoutExpired:
        emit(event="fit", impl="otb", finished=False, stopped_after_s=args.otb_timeout, samples=n_samples)
        return
    note = "includes OTB's validation pass on the training set"
    emit(event="fit", impl="otb", seconds=round(t_otb_fit, 2), note=note)
    emit(event="fit_ratio", ours_over_otb=round(t_fit / t_otb_fit, 3), goal="<= 0.333")

    cmd = [otb_cls, "-in", str(img), "-model", str(model), "-out", str(out), "uint8", "-ram", "4096"]
    cmd += ["-nbclasses", str(N_CLASSES)]
    t_otb_pred = run(cmd, env)
    import rasterio

    with rasterio.open(out) as src:
        otb_map = src.read(1).ravel()
    emit(
        event="predict",
        impl="otb",
        seconds=round(t_otb_pred, 2),
        px_per_s=round(side * side / t_otb_pred),
        accuracy=round(float((otb_map == truth.ravel()).mean()), 4),
        agreement_with_ours=round(float((otb_map == ours).mean()), 4),
    )
    # like for like: ours including the read of the same GTiff
    t = time.perf_counter()
    with rasterio.open(img) as src:
        feats_img = src.read().reshape(N_FEATURES, -1).T
    predict_ours(rf, np.ascontiguousarray(feats_img), args.threads)
    t_io = time.perf_counter() - t
    emit(
        event="predict",
        impl="compiled+gtiff_read",
        seconds=round(t_io, 2),
        px_per_s=round(side * side / t_io),
    )
    emit(
        event="predict_ratio",
        ours_px_s_over_otb=round(t_otb_pred / min(t_pred, t_pred1), 2),
        with_read=round(t_otb_pred / t_io, 2),
        goal=">= 10",
    )
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
