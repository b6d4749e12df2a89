"""What runs the model, below the pipeline: where and in what precision (device), how policies
are loaded (loading, hf_checkpoints, tokens), the forward pass with its weights laid out once
(fast_path, with fast_weights and fast_blocks), LoRA adapters (lora), data-parallel processes
(distributed), and writing a policy out for other tools (export, export_checks). Nothing here
imports the pipeline above it."""
