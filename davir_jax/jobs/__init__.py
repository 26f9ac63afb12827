"""The jobs (score, select, sft, dpo, eval, plan, pipeline): each reads top to bottom."""
