"""What the stages share: errors, the row guard, runtime helpers, metrics, the object vocabulary, the shapes world."""
