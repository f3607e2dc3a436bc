"""The caption model: its config, the nn.Module, mappers, image encoders, LoRA adapters, the model
directory format, hub names and the ClipCap import."""
