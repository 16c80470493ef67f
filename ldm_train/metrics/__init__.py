"""Sample-quality metrics: FD / KID on CLIP or Inception features, CLIP score, zero-shot accuracy
(zero_shot.py; SampleMetrics), the chain's prompt check (prompt_accuracy.py), for the stages'
validation and `python -m ldm_train.evaluate`."""
