"""Uploaded datasets (JSONL or TXT) that fine-tuning and evaluation jobs name by id."""
