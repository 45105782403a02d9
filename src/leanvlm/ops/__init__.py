"""Pure tensor functions: no model knowledge, no hooks. Every function documents its tensor shapes."""
