"""bitcoin."""
