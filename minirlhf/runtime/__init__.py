"""What runs the model, below the pipeline: where and in what precision (device), how policies
are loaded (loading, tokens), the forward pass with its weights laid out once (fast_path), LoRA
adapters (lora), data-parallel processes (distributed), and writing a policy out for other tools
(export). Nothing here imports the pipeline above it."""
