"""The on-disk checkpoint format beneath training, evaluation and export.

Layout of a checkpoint directory (`checkpoint.dir`):

    latest                      tag of the newest complete checkpoint (written last, atomically)
    iter_0000100/
        llm_meta.json           iteration, consumed samples, our effective config, the layout
        mp_rank_00_model_states.pt, *optim_states.pt, layer_*  DeepSpeed's files
        rng/rank_NNNNN.pt       every random stream of each rank                    (rng.py)
        layout/rank_NNNNN.json  each rank's coordinates, files, optimizer order and the layout of
                                every parameter it holds (TP split, stage)         (engine.py)
        MANIFEST.json           every file, its size and xxh3-64 checksum, written when all ranks are done
        universal/              full per-parameter state: made on the first resume at another
                                layout, or written by a Hugging Face import          (reshard.py)

Modules: `format` (tags, meta, MANIFEST, `latest`, choosing and pruning), `engine` (save and load
through a DeepSpeed engine), `merge` (full weights without an engine, for evaluation and export),
`reshard` (the universal form and layout-changing resume), `rng` (random streams).
"""
