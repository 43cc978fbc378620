"""Two-stage training: sampler, collator, GradCache, per-worker loop, Ray Train stages."""
