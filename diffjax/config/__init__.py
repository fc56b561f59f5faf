"""The config schema with its defaults (``defaults``) and its up-front validation
(``validation``); the experiment configs themselves live in the top-level ``configs/``."""
