# The national product (pipeline/mosaic.py, docs/mosaic.md): each classifier's tile maps, confidence
# and validity layers on one national grid, overlaps to the nearest tile centre, areas counted once.
# One job per classifier; a rerun of one tile's map reruns its classifier's mosaic (a full pass over
# the tiles: docs/mosaic.md gives its cost).


rule mosaic:
    input:
        maps=expand(str(LAYOUT.class_map("{{model}}", "{tile}")), tile=TILES),
        confidence=expand(str(LAYOUT.confidence("{{model}}", "{tile}")), tile=TILES),
        validity=expand(str(LAYOUT.validity("{tile}")), tile=TILES),
        # with inference.probabilities the national uncertainty layer comes from the same pass
        **({"margins": expand(str(LAYOUT.margin("{{model}}", "{tile}")), tile=TILES)} if PROBABILITIES else {}),
    output:
        classes=str(LAYOUT.mosaic("{model}", "classes")),
        confidence=str(LAYOUT.mosaic("{model}", "confidence")),
        clear_count=str(LAYOUT.mosaic("{model}", "clear")),
        areas=report(
            str(LAYOUT.mosaic("{model}", "areas")),
            caption="../report/mosaic.rst",
            category="National mosaic",
            labels={"classifier": "{model}", "table": "areas"},
        ),
        summary=str(LAYOUT.mosaic("{model}", "summary")),
        **({"margin": str(LAYOUT.mosaic("{model}", "margin"))} if PROBABILITIES else {}),
    log:
        str(LAYOUT.log("mosaic", "{model}")),
    benchmark:
        str(LAYOUT.benchmark("mosaic", "{model}"))
    threads: 2
    resources:
        **job_resources("mosaic"),
    params:
        settings=settings("mosaic"),
    shell:
        "{LANDCOVER} mosaic --model {wildcards.model} 2> {log}"


REGIONS = RUN_CONFIG["inputs"]["regions"]


rule regions:
    input:
        classes=str(LAYOUT.mosaic("{model}", "classes")),
        confidence=str(LAYOUT.mosaic("{model}", "confidence")),
        clear_count=str(LAYOUT.mosaic("{model}", "clear")),
        regions=REGIONS or [],
    output:
        table=report(
            str(LAYOUT.mosaic("{model}", "regions")),
            caption="../report/regions.rst",
            category="National mosaic",
            labels={"classifier": "{model}", "table": "regions"},
        ),
        layer=str(LAYOUT.mosaic("{model}", "regions_layer")),
    log:
        str(LAYOUT.log("regions", "{model}")),
    benchmark:
        str(LAYOUT.benchmark("regions", "{model}"))
    resources:
        **job_resources("regions"),
    params:
        settings=settings("regions"),
    shell:
        "{LANDCOVER} regions --model {wildcards.model} 2> {log}"


rule vector:
    input:
        classes=str(LAYOUT.mosaic("{model}", "classes")),
        confidence=str(LAYOUT.mosaic("{model}", "confidence")),
        regions=REGIONS or [],
    output:
        directory(str(LAYOUT.vector_dir("{model}"))),
    log:
        str(LAYOUT.log("vector", "{model}")),
    benchmark:
        str(LAYOUT.benchmark("vector", "{model}"))
    resources:
        **job_resources("vector"),
    params:
        settings=settings("vector"),
    shell:
        "{LANDCOVER} vector --model {wildcards.model} 2> {log}"
