# Land-cover map production chain. Rules only wire files to `landcover <stage>` subcommands;
# all logic lives in the `pipeline` package (see docs/architecture.md).
#   snakemake --cores all                         # the whole run (default config: the demo country)
#   snakemake --cores 2 results/demo/maps/rf/T31TCJ.tif   # one tile's map
#   snakemake --profile slurm                     # every job on a SLURM cluster (docs/slurm.md)
#   snakemake --report report.html                # Snakemake's report of a finished run (docs/report.md)

from snakemake.utils import min_version

min_version("8.0")


# config.yaml (the demo country) is the default run only: a run given its own --configfile reads
# exactly the files it names, so a user's config never has the demo merged underneath it. Overlays
# on the demo name it first: --configfile config.yaml profiles/paper.yaml.
if not workflow.overwrite_configfiles:

    configfile: "config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/demo.smk"
include: "workflow/rules/preprocess.smk"
include: "workflow/rules/reference.smk"
include: "workflow/rules/classify.smk"
include: "workflow/rules/qa.smk"
include: "workflow/rules/mosaic.smk"
include: "workflow/rules/accuracy.smk"
include: "workflow/rules/report.smk"


rule all:
    input:
        expand(str(LAYOUT.class_map("{model}", "{tile}")), model=MODELS, tile=TILES),
        expand(str(LAYOUT.validity("{tile}")), tile=TILES),
        expand(str(LAYOUT.metrics("{model}", "{tile}")), model=MODELS, tile=TILES),
        expand(str(LAYOUT.confidence("{model}", "{tile}")), model=MODELS, tile=TILES),
        expand(str(LAYOUT.overall_metrics("{model}")), model=MODELS),
        str(LAYOUT.comparison("md")),
        expand(str(LAYOUT.mosaic("{model}", "summary")), model=CLASSIFIERS),
        expand(str(LAYOUT.mosaic("{model}", "regions")), model=CLASSIFIERS if REGIONS else []),
        expand(str(LAYOUT.vector_dir("{model}")), model=CLASSIFIERS),
        expand(str(LAYOUT.qa("{tile}")), tile=TILES if REFERENCES else []),
        str(LAYOUT.report()),
        str(LAYOUT.catalogue().parent),
        [str(LAYOUT.accuracy("design"))] if ACCURACY else [],
        [str(LAYOUT.accuracy("estimates"))] if ESTIMATE else [],
        expand(str(LAYOUT.suggestions("{model}")), model=CLASSIFIERS if PROBABILITIES else []),
