"""Pipeline stages: one module per stage, each a callable class over Ray Data batches."""
