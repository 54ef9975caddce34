# The embedded demo country: only when the config has a `demo` section.

if "demo" in RUN_CONFIG:

    rule demo:
        output:
            tiles=[directory(RUN_CONFIG["inputs"]["tiles"][t]["path"]) for t in TILES],
            reference=RUN_CONFIG["inputs"]["reference"],
            regions=[RUN_CONFIG["inputs"]["regions"]] if RUN_CONFIG["inputs"]["regions"] else [],
        log:
            str(LAYOUT.log("demo")),
        benchmark:
            str(LAYOUT.benchmark("demo"))
        resources:
            **job_resources("demo"),
        params:
            settings=settings("demo"),
        shell:
            "{LANDCOVER} demo 2> {log}"
