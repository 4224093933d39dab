"""Training data for fine-tuning and distillation: real cases, synthetic volumes,
ROI crops through the engine's own preprocessing, and batch augmentation."""
