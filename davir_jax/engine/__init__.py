"""The NLL engine and the trainer every job uses, with the checks a job runs first."""
