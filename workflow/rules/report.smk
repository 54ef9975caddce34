# The run's QA report (pipeline/report, docs/report.md): every classifier side by side, maps, the
# geometric QA, seeds and provenance in one self-contained HTML file. It also reads the benchmark
# files of the other rules when they are there (not inputs: the report never reruns a stage).


rule report:
    input:
        maps=expand(str(LAYOUT.class_map("{model}", "{tile}")), model=CLASSIFIERS, tile=TILES),
        confidence=expand(str(LAYOUT.confidence("{model}", "{tile}")), model=CLASSIFIERS, tile=TILES),
        validity=expand(str(LAYOUT.validity("{tile}")), tile=TILES),
        metrics=expand(str(LAYOUT.metrics("{model}", "{tile}")), model=MODELS, tile=TILES),
        overall=expand(str(LAYOUT.overall_metrics("{model}")), model=MODELS),
        qa=expand(str(LAYOUT.qa("{tile}")), tile=TILES if REFERENCES else []),
        mosaics=expand(str(LAYOUT.mosaic("{model}", "summary")), model=CLASSIFIERS),
        regions=expand(str(LAYOUT.mosaic("{model}", "regions")), model=CLASSIFIERS if REGIONS else []),
        estimates=[str(LAYOUT.accuracy("estimates"))] if ESTIMATE else [],
    output:
        report(str(LAYOUT.report()), caption="../report/qa_report.rst", category="QA report"),
    log:
        str(LAYOUT.log("report")),
    benchmark:
        str(LAYOUT.benchmark("report"))
    resources:
        **job_resources("report"),
    params:
        settings=settings("report"),
    shell:
        "{LANDCOVER} report --out {output} 2> {log}"


# The STAC catalogue (pipeline/catalogue.py, docs/mosaic.md): an item per tile and one for the
# national product, relative hrefs, so the workdir can be copied to a web server as it is.
rule catalogue:
    input:
        maps=expand(str(LAYOUT.class_map("{model}", "{tile}")), model=CLASSIFIERS, tile=TILES),
        confidence=expand(str(LAYOUT.confidence("{model}", "{tile}")), model=CLASSIFIERS, tile=TILES),
        validity=expand(str(LAYOUT.validity("{tile}")), tile=TILES),
        mosaics=expand(str(LAYOUT.mosaic("{model}", "summary")), model=CLASSIFIERS),
        regions=expand(str(LAYOUT.mosaic("{model}", "regions")), model=CLASSIFIERS if REGIONS else []),
        vector=expand(str(LAYOUT.vector_dir("{model}")), model=CLASSIFIERS),
        report=str(LAYOUT.report()),
    output:
        directory(str(LAYOUT.catalogue().parent)),
    log:
        str(LAYOUT.log("catalogue")),
    benchmark:
        str(LAYOUT.benchmark("catalogue"))
    resources:
        **job_resources("catalogue"),
    params:
        settings=settings("catalogue"),
    shell:
        "{LANDCOVER} catalogue 2> {log}"
