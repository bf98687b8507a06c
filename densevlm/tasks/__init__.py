"""One driver per job: ``align`` (DenseVLM / CLIPSelf training), ``pretrain``, ``talk2dino`` (cache + ψ training),
``teacher_cache`` (``cache-teacher``). Methods trained by ``align`` register a builder in :data:`METHODS`
(:mod:`densevlm.tasks.registry`); the engine's loop knows none of them by name."""
