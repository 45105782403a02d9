"""The machinery that applies a method's stages to a model instance through reversible hooks."""
