"""What every layer may use: atomic writes, optional extras, and what the hardware runs fast."""
