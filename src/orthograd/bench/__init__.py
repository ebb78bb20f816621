"""The experiment engine every benchmark task runs on: configs, jobs in phases, executors, results logs, records.

A task is a package (``image_bench``, ``asr_bench``, ``llm_bench``) with its config and its ``Experiment``;
``bench.experiments.run_experiment`` runs any task's config, ``orthograd bench CONFIG.yaml`` from the command line.
"""
