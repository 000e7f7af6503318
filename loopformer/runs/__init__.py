"""The run directory: what a training run leaves on disk, and everything that opens one.

    layout      `RunDir`: the directory's files, named in one place (the layout is drawn there)
    log         `log`: progress messages (stderr; the trainer's go to stdout)
    checkpoint  `Checkpoints`: orbax checkpoints with per-array checksums; full or partial restore
    read        `load_run_config`, `read_run` -> `RunInfo`: a run's config, before any weights are read
    restore     `make_model`, `abstract_model`, `restore_params`: a run's model and trained (EMA) params
    prepare     `prepare_run_dir`, `resume_changes`, `record_changes`: the trainer starting or resuming a run
    lock        `run_lock`: one trainer per run directory

Opening and restoring a run needs no optimizer: an analysis command imports this package, never
`loopformer.train`. `layout` and `log` import nothing of loopformer, so the data layer (below this
package) uses them too; this file imports nothing, so importing them stays cheap.
"""
