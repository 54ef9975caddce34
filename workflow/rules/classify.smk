# Train each configured classifier on all tiles, map every tile, validate, compare.


def train_inputs(wildcards):
    """Networks also need every tile's precomputed patch positions, and their starting model."""
    inputs = {
        "gapfilled": expand(str(LAYOUT.gapfilled("{tile}")), tile=TILES),
        "labels": expand(str(LAYOUT.labels("{tile}")), tile=TILES),
        "percentiles": str(LAYOUT.percentiles()),
    }
    classifier = classifier_of(wildcards.model)
    if is_network(classifier):
        inputs["patches"] = expand(str(LAYOUT.patches("{tile}")), tile=TILES)
        # nets.init_from: a new starting model retrains (its folder is checked by the train job)
        if start := init_folder(RUN_CONFIG["nets"].get("init_from"), classifier):
            inputs["init_from"] = str(start / "weights.pt")
    if classifier in HYBRIDS:  # fgunet_rf(-s7) reads the trained fgunet(-s7) beside it
        _, seed = Layout.split_seed_model(wildcards.model)
        network = HYBRIDS[classifier] if seed is None else Layout.seed_model(HYBRIDS[classifier], seed)
        inputs["network"] = str(LAYOUT.model_receipt(network))
    return inputs


rule patches:
    input:
        str(LAYOUT.labels("{tile}")),
    output:
        train=str(LAYOUT.patches("{tile}", "train")),
        selection=str(LAYOUT.patches("{tile}", "selection")),
    log:
        str(LAYOUT.log("patches", "{tile}")),
    benchmark:
        str(LAYOUT.benchmark("patches", "{tile}"))
    resources:
        **job_resources("patches"),
    params:
        settings=settings("patches"),
    shell:
        "{LANDCOVER} patches --tile {wildcards.tile} --labels {input} --out {output.train} 2> {log}"


rule train:
    input:
        unpack(train_inputs),
    output:
        # the receipt, written once models/<model>/ is in place: Snakemake deletes a job's outputs
        # before it runs and after it fails, and the folder must outlive a failed retrain
        str(LAYOUT.model_receipt("{model}")),
    log:
        str(LAYOUT.log("train", "{model}")),
    benchmark:
        str(LAYOUT.benchmark("train", "{model}"))
    wildcard_constraints:
        model="|".join(MODELS),  # the QA's reference RFs come from train_reference
    threads: all_cores()
    resources:
        # rf: one task; a network: resources.train_network's nodes x tasks_per_node, and under
        # SLURM `launch` is the srun starting them (empty locally: one process)
        **job_resources("train"),
    params:
        settings=settings("train"),
        folder=lambda w: str(LAYOUT.model_dir(w.model)),
    shell:
        # networks checkpoint every epoch into <model>.checkpoints/: rerunning resumes there
        # an extra seed's model (<classifier>-s<seed>, run.seeds) is `--model rf-s7`: rf with seed 7
        "{resources.launch}{LANDCOVER} train --model {wildcards.model} --out {params.folder}"
        " --receipt {output} 2> {log}"


rule predict:
    input:
        model=str(LAYOUT.model_receipt("{model}")),
        gapfilled=str(LAYOUT.gapfilled("{tile}")),
    output:
        map=str(LAYOUT.class_map("{model}", "{tile}")),
        confidence=str(LAYOUT.confidence("{model}", "{tile}")),
    log:
        str(LAYOUT.log("predict", "{model}_{tile}")),
    benchmark:
        str(LAYOUT.benchmark("predict", "{model}_{tile}"))
    resources:
        **job_resources("predict"),
    params:
        settings=settings("predict"),
        folder=lambda w: str(LAYOUT.model_dir(w.model)),
    shell:
        "{LANDCOVER} predict --model {wildcards.model} --tile {wildcards.tile} --model-dir {params.folder}"
        " --src {input.gapfilled} --out {output.map} --confidence {output.confidence} 2> {log}"


# With inference.probabilities, the classifiers' maps (not the QA's reference RFs) come with every
# class's probability and the uncertainty layer, from the same inference pass.
PROBABILITIES = bool(RUN_CONFIG["inference"]["probabilities"])

if PROBABILITIES:

    ruleorder: predict_uncertain > predict

    rule predict_uncertain:
        input:
            model=str(LAYOUT.model_receipt("{model}")),
            gapfilled=str(LAYOUT.gapfilled("{tile}")),
        output:
            map=str(LAYOUT.class_map("{model}", "{tile}")),
            confidence=str(LAYOUT.confidence("{model}", "{tile}")),
            probabilities=str(LAYOUT.probabilities("{model}", "{tile}")),
            margin=str(LAYOUT.margin("{model}", "{tile}")),
        wildcard_constraints:
            model="|".join(CLASSIFIERS),
        log:
            str(LAYOUT.log("predict", "{model}_{tile}")),
        benchmark:
            str(LAYOUT.benchmark("predict", "{model}_{tile}"))
        resources:
            **job_resources("predict"),
        params:
            settings=settings("predict"),
            folder=lambda w: str(LAYOUT.model_dir(w.model)),
        shell:
            "{LANDCOVER} predict --model {wildcards.model} --tile {wildcards.tile} --model-dir {params.folder}"
            " --src {input.gapfilled} --out {output.map} --confidence {output.confidence}"
            " --probabilities {output.probabilities} --margin {output.margin} 2> {log}"

    rule suggest:
        input:
            maps=expand(str(LAYOUT.class_map("{{model}}", "{tile}")), tile=TILES),
            margins=expand(str(LAYOUT.margin("{{model}}", "{tile}")), tile=TILES),
        output:
            str(LAYOUT.suggestions("{model}")),
        log:
            str(LAYOUT.log("suggest", "{model}")),
        resources:
            **job_resources("accuracy"),
        params:
            settings=settings("suggest"),
        shell:
            "{LANDCOVER} suggest --model {wildcards.model} 2> {log}"


rule validate:
    input:
        map=str(LAYOUT.class_map("{model}", "{tile}")),
        labels=str(LAYOUT.labels("{tile}")),
    output:
        str(LAYOUT.metrics("{model}", "{tile}")),
    log:
        str(LAYOUT.log("validate", "{model}_{tile}")),
    benchmark:
        str(LAYOUT.benchmark("validate", "{model}_{tile}"))
    resources:
        **job_resources("validate"),
    params:
        settings=settings("validate"),
    shell:
        "{LANDCOVER} validate --model {wildcards.model} --tile {wildcards.tile} --map {input.map}"
        " --labels {input.labels} --out {output} 2> {log}"


rule summarise:
    input:
        expand(str(LAYOUT.metrics("{{model}}", "{tile}")), tile=TILES),
    output:
        str(LAYOUT.overall_metrics("{model}")),
    log:
        str(LAYOUT.log("summarise", "{model}")),
    benchmark:
        str(LAYOUT.benchmark("summarise", "{model}"))
    resources:
        **job_resources("summarise"),
    params:
        settings=settings("summarise"),
    shell:
        "{LANDCOVER} summarise --model {wildcards.model} --out {output} {input} 2> {log}"


rule compare:
    input:
        expand(str(LAYOUT.overall_metrics("{model}")), model=CLASSIFIERS),
    output:
        md=str(LAYOUT.comparison("md")),
        csv=report(str(LAYOUT.comparison("csv")), caption="../report/comparison.rst", category="Metrics"),
    log:
        str(LAYOUT.log("compare")),
    benchmark:
        str(LAYOUT.benchmark("compare"))
    resources:
        **job_resources("compare"),
    params:
        settings=settings("compare"),
    shell:
        "{LANDCOVER} compare --out {output.md} {input} 2> {log}"


# --- geometric QA references (seed 4.3): R pixel-based RF maps, each trained without one fold ---


rule train_reference:
    input:
        gapfilled=expand(str(LAYOUT.gapfilled("{tile}")), tile=TILES),
        labels=expand(str(LAYOUT.labels("{tile}")), tile=TILES),
        percentiles=str(LAYOUT.percentiles()),
    output:
        str(LAYOUT.model_receipt(LAYOUT.reference_model("{fold}"))),
    log:
        str(LAYOUT.log("train_reference", "{fold}")),
    benchmark:
        str(LAYOUT.benchmark("train_reference", "{fold}"))
    wildcard_constraints:
        fold="[0-9]+",
    threads: all_cores()
    resources:
        **job_resources("train_reference"),
    params:
        settings=settings("train_reference"),
        folder=lambda w: str(LAYOUT.model_dir(LAYOUT.reference_model(w.fold))),
    shell:
        "{LANDCOVER} train --model rf --fold {wildcards.fold} --out {params.folder} --receipt {output} 2> {log}"
