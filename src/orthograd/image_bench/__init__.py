"""The image-classification benchmark: its config, data, models, jobs and splits, experiment, references and report.

``orthograd bench CONFIG.yaml`` runs a config without ``task:`` (or ``task: classification``) as
``experiment.ImageExperiment`` on the engine (``bench.engine``); ``orthograd report RUN_DIR`` rewrites its tables
and plots (``report``). The demo is its shipped ``configs/demo.yaml``.
"""

# the task ``orthograd bench`` runs from this package (``bench.experiments.benchmark_tasks``)
BENCHMARK_TASK = (
    "classification", "orthograd.image_bench.config:BenchConfig", "orthograd.image_bench.experiment:ImageExperiment"
)
