# Reference polygons: one run-wide split, then per-tile label rasters.


rule split:
    input:
        polygons=RUN_CONFIG["inputs"]["reference"],
        grids=expand(str(LAYOUT.ingest("{tile}")), tile=TILES),
    output:
        str(LAYOUT.split()),
    log:
        str(LAYOUT.log("split")),
    benchmark:
        str(LAYOUT.benchmark("split"))
    resources:
        **job_resources("split"),
    params:
        settings=settings("split"),
    shell:
        "{LANDCOVER} split --out {output} 2> {log}"


rule rasterise:
    input:
        split=str(LAYOUT.split()),
        grid=str(LAYOUT.ingest("{tile}")),
    output:
        directory(str(LAYOUT.labels("{tile}"))),
    log:
        str(LAYOUT.log("rasterise", "{tile}")),
    benchmark:
        str(LAYOUT.benchmark("rasterise", "{tile}"))
    resources:
        **job_resources("rasterise"),
    params:
        settings=settings("rasterise"),
    shell:
        "{LANDCOVER} rasterise --tile {wildcards.tile} --split {input.split} --grid {input.grid}"
        " --out {output} 2> {log}"
