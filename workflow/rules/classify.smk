# Train each configured classifier on all tiles, map every tile, validate.


rule train:
    input:
        gapfilled=expand(str(LAYOUT.gapfilled("{tile}")), tile=TILES),
        labels=expand(str(LAYOUT.labels("{tile}")), tile=TILES),
        percentiles=str(LAYOUT.percentiles()),
    output:
        directory(str(LAYOUT.model_dir("{model}"))),
    log:
        str(LAYOUT.workdir / "logs" / "train_{model}.log"),
    threads: workflow.cores
    shell:
        "{LANDCOVER} train --model {wildcards.model} --out {output} 2> {log}"


rule predict:
    input:
        model=str(LAYOUT.model_dir("{model}")),
        gapfilled=str(LAYOUT.gapfilled("{tile}")),
    output:
        str(LAYOUT.class_map("{model}", "{tile}")),
    log:
        str(LAYOUT.workdir / "logs" / "predict_{model}_{tile}.log"),
    shell:
        "{LANDCOVER} predict --model {wildcards.model} --tile {wildcards.tile} --model-dir {input.model}"
        " --src {input.gapfilled} --out {output} 2> {log}"


rule validate:
    input:
        map=str(LAYOUT.class_map("{model}", "{tile}")),
        labels=str(LAYOUT.labels("{tile}")),
    output:
        str(LAYOUT.metrics("{model}", "{tile}")),
    log:
        str(LAYOUT.workdir / "logs" / "validate_{model}_{tile}.log"),
    shell:
        "{LANDCOVER} validate --model {wildcards.model} --tile {wildcards.tile} --map {input.map}"
        " --labels {input.labels} --out {output} 2> {log}"


rule summarise:
    input:
        expand(str(LAYOUT.metrics("{{model}}", "{tile}")), tile=TILES),
    output:
        str(LAYOUT.overall_metrics("{model}")),
    log:
        str(LAYOUT.workdir / "logs" / "summarise_{model}.log"),
    shell:
        "{LANDCOVER} summarise --model {wildcards.model} --out {output} {input} 2> {log}"
