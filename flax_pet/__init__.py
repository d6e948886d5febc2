"""flax-pet."""
