"""One driver per job, above every library package (see docs/ARCHITECTURE.md): ``align`` (DenseVLM / CLIPSelf
training; methods register a builder in :data:`densevlm.tasks.methods.METHODS`, the engine's loop knows none of them
by name), ``pretrain``, ``talk2dino`` (cache + ψ training), ``teacher_cache`` (``cache-teacher``), ``zoo_build``
(re-makes the zoo from its recipes) and ``zoo_quality`` (a zoo's models on the first toy-val images)."""
