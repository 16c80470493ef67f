"""Sample-quality metrics: FD / KID on CLIP or Inception features, CLIP score, zero-shot accuracy
(SampleMetrics), for the stages' validation and `python -m ldm_train.evaluate`."""
