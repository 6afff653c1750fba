"""Evaluation: teacher-forced target scoring, editing metrics, general-ability tasks, perplexity."""
