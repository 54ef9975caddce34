# Ingest -> gapfill/resample (+ exact histograms, same pass) -> run-wide percentiles.


rule ingest:
    input:
        tile_products,
    output:
        directory(str(LAYOUT.ingest("{tile}"))),
    log:
        str(LAYOUT.log("ingest", "{tile}")),
    benchmark:
        str(LAYOUT.benchmark("ingest", "{tile}"))
    resources:
        **job_resources("ingest"),
    params:
        settings=settings("ingest"),
        # product folders are ingested, netCDF/zarr cubes imported: the same store either way
        stage=lambda wc: "import" if RUN_CONFIG["inputs"]["tiles"][wc.tile]["format"] == "cube" else "ingest",
    shell:
        "{LANDCOVER} {params.stage} --tile {wildcards.tile} --out {output} 2> {log}"


rule gapfill:
    input:
        str(LAYOUT.ingest("{tile}")),
    output:
        store=directory(str(LAYOUT.gapfilled("{tile}"))),
        # the cube's exact histograms, counted while each window is in memory (no second read)
        histogram=str(LAYOUT.histogram("{tile}")),
    log:
        str(LAYOUT.log("gapfill", "{tile}")),
    benchmark:
        str(LAYOUT.benchmark("gapfill", "{tile}"))
    resources:
        **job_resources("gapfill"),
    params:
        settings=settings("gapfill"),
    shell:
        "{LANDCOVER} gapfill --tile {wildcards.tile} --src {input} --out {output.store}"
        " --histogram {output.histogram} 2> {log}"


rule percentiles:
    input:
        expand(str(LAYOUT.histogram("{tile}")), tile=TILES),
    output:
        str(LAYOUT.percentiles()),
    log:
        str(LAYOUT.log("percentiles")),
    benchmark:
        str(LAYOUT.benchmark("percentiles"))
    resources:
        **job_resources("percentiles"),
    params:
        settings=settings("percentiles"),
    shell:
        "{LANDCOVER} percentiles --out {output} {input} 2> {log}"


rule validity:
    input:
        str(LAYOUT.gapfilled("{tile}")),
    output:
        str(LAYOUT.validity("{tile}")),
    log:
        str(LAYOUT.log("validity", "{tile}")),
    benchmark:
        str(LAYOUT.benchmark("validity", "{tile}"))
    resources:
        **job_resources("validity"),
    params:
        settings=settings("validity"),
    shell:
        "{LANDCOVER} validity --tile {wildcards.tile} --src {input} --out {output} 2> {log}"
