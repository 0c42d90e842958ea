"""Training jobs: ``python -m anatomask_fast.train pretrain`` (AnatoMask pretraining;
the default when no job is named)."""
