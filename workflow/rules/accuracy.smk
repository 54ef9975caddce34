# Design-based accuracy and areas (pipeline/sampledesign.py, docs/validation.md): a stratified random
# sample of one classifier's national mosaic, labelled by interpreters (the demo's interpreter in the
# demo), gives every classifier's accuracy and class areas with 95 % confidence intervals.

ACCURACY = bool(RUN_CONFIG["accuracy"]["enabled"])
DESIGN_ON = RUN_CONFIG["accuracy"]["design_on"] or CLASSIFIERS[0]
LABELLED = RUN_CONFIG["inputs"]["labelled_sample"]
# estimates need labels: the interpreters' file, or the demo's interpreter
ESTIMATE = ACCURACY and bool(LABELLED or "demo" in RUN_CONFIG)


# ancient(): once drawn (and perhaps labelled), the sample is not drawn again because a tile's map
# was rerun; the estimates read the new maps at the same points (Stehman 2014), see the docs.
rule design:
    input:
        mosaic=ancient(str(LAYOUT.mosaic(DESIGN_ON, "classes"))),
    output:
        points=str(LAYOUT.accuracy("points")),
        csv=str(LAYOUT.accuracy("points_csv")),
        design=str(LAYOUT.accuracy("design")),
    log:
        str(LAYOUT.log("design")),
    benchmark:
        str(LAYOUT.benchmark("design"))
    resources:
        **job_resources("accuracy"),
    params:
        settings=settings("design"),
    shell:
        "{LANDCOVER} design 2> {log}"


if "demo" in RUN_CONFIG and not LABELLED:

    rule interpret:
        input:
            points=str(LAYOUT.accuracy("points")),
            mosaic=ancient(str(LAYOUT.mosaic(DESIGN_ON, "classes"))),
        output:
            labelled=str(LAYOUT.accuracy("labelled")),
            truth=str(LAYOUT.accuracy("truth")),
        log:
            str(LAYOUT.log("interpret")),
        resources:
            **job_resources("accuracy"),
        params:
            settings=settings("interpret"),
        shell:
            "{LANDCOVER} interpret 2> {log}"


rule estimate:
    input:
        design=str(LAYOUT.accuracy("design")),
        points=str(LAYOUT.accuracy("points_csv")),
        labelled=LABELLED or str(LAYOUT.accuracy("labelled")),
        mosaics=expand(str(LAYOUT.mosaic("{model}", "classes")), model=CLASSIFIERS),
    output:
        str(LAYOUT.accuracy("estimates")),
    log:
        str(LAYOUT.log("estimate")),
    benchmark:
        str(LAYOUT.benchmark("estimate"))
    resources:
        **job_resources("accuracy"),
    params:
        settings=settings("estimate"),
    shell:
        "{LANDCOVER} estimate 2> {log}"
