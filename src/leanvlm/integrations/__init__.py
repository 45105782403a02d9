"""Integrations with evaluation harnesses (lmms-eval: `leanvlm.integrations.lmms_eval`)."""
