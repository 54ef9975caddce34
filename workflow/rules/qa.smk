# Geometric QA (seed 4.3): corners of every classifier's map matched against R reference RF maps.
# The reference RFs come from train_reference (classify.smk) and are mapped by the predict rule.

REFERENCES = [LAYOUT.reference_model(i) for i in range(RUN_CONFIG["qa"]["references"])]


rule qa:
    input:
        maps=expand(str(LAYOUT.class_map("{model}", "{{tile}}")), model=CLASSIFIERS),
        references=expand(str(LAYOUT.class_map("{ref}", "{{tile}}")), ref=REFERENCES),
    output:
        report(
            str(LAYOUT.qa("{tile}")),
            caption="../report/qa.rst",
            category="Geometric QA",
            labels={"tile": "{tile}"},
        ),
    log:
        str(LAYOUT.log("qa", "{tile}")),
    benchmark:
        str(LAYOUT.benchmark("qa", "{tile}"))
    threads: 2
    resources:
        **job_resources("qa"),
    params:
        settings=settings("qa"),
    shell:
        "{LANDCOVER} qa --tile {wildcards.tile} --out {output} --references {input.references} 2> {log}"
