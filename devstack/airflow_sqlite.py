"""SQLAlchemy connect args for Airflow's embedded SQLite database (``[database] sql_alchemy_connect_args``).

Four Airflow processes share one SQLite file under `make ui`. WAL journaling (set by
``services.migrate_airflow``) stops readers from blocking the writer. The lock wait stays short on purpose:
two api-server requests can block each other inside one process (seen with a trigger racing a task's
state update), and a short wait ends that with one failed request (retried by its client) instead of a
minute-long stall that times out the task. SQLite is for one machine; production uses Postgres (compose).
"""

CONNECT_ARGS = {"timeout": 10}
