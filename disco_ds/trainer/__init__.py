"""The pretraining stack behind ``disco_ds train``: the run config (:mod:`.config`), the η*/B*
scaling rules (:mod:`.scaling`), the WSD schedule (:mod:`.schedule`), model, engine and optimizer
construction (:mod:`.build`), the loop (:mod:`.loop`), checks before the process group
(:mod:`.preflight`), verified checkpoints (:mod:`.checkpoint`, :mod:`.resume`), logging and
evaluation (:mod:`.metrics`, :mod:`.evaluation`), the memory estimate (:mod:`.memory`), norm
guidance and sweeps (:mod:`.guidance`, :mod:`.sweep`)."""
