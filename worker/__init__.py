"""Workers: thin Celery tasks (tasks.py) that take a job id and call runner.run_job, which turns a
job row into a call of welore_core, forwards progress and metrics to the event bus and records
the final state and artifacts. The embedded server runs run_job in a thread pool instead.
torch and transformers are imported lazily, inside the job handlers only."""
