"""deployd: a self-hosted deploy daemon for Apache Airflow projects."""

__version__ = "0.1.0"
